"""The base LM p₀ and a twist, behind the interface the sampler and the losses use.

Sampling is incremental: ``start`` runs the prompt once (batch 1) and expands its KV cache to N
particles; each ``advance`` feeds one token per particle; ``reorder`` applies resampling ancestors
to every cache (base and separate twist). ``forward_full`` is the one teacher-forced pass that the
losses and the exact evaluator use: log p₀ [N, T, V] and log ψ [N, T, V] for every output step.

A *policy* (PPO, GFlowNet; :mod:`smclm.models.policy`) is a proposal q learned directly rather
than induced by the twist. It has the twist interface (``begin``/``advance``/``reorder``/``full``)
but returns policy logits l: log q = log_softmax(log p₀ + l) when ``policy.residual`` (a logit
modifier on p₀), else log_softmax(l). With a policy, ``StepDists.log_q`` carries the proposal and
the twist (if any) only defines the intermediate targets of SMC (ψ ≡ 1 when there is none).

All log-probabilities are returned in float32, whatever the model dtype.

A task's tool (``task.calculator``: :class:`smclm.tasks.calculator.CalculatorTool`, set by
:meth:`TwistedLM.set_tool` like the logit bias) makes forced steps: after a trigger token the
tool's tokens follow with a one-hot next-token distribution, for p₀ and every proposal (the
policy's, the twisted one, which is one-hot because p₀ is). Their log p₀ and log q are 0, so
they sit in the context without counting in log q or in p₀'s probability of the actions. The
sampler needs no branch for it (it draws the one forced token); ``start``/``advance`` keep each
particle's queue of forced tokens (:class:`ToolState`, reordered with the caches), and the
teacher-forced passes rebuild it from the tokens (:meth:`TwistedLM.forced_targets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smclm.models.cache import cache_kwargs, reorder_cache


def _config_number(cfg: Any, name: str) -> float | None:
    """``cfg.name`` when it is a number (not a bool), else None."""
    value = getattr(cfg, name, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def output_logits(base: nn.Module, h: Tensor) -> Tensor:
    """The base LM's next-token logits (float32) from the last hidden states h [..., d] of its
    body (``base.base_model``): its output head, then the transforms that some architectures'
    forwards apply after the head: Gemma's soft-capping (``final_logit_softcapping``), Granite's
    ``logits_scaling`` and Cohere's ``logit_scale``. :func:`check_output_head` refuses a model
    whose own logits this does not reproduce. A task's logit bias (:func:`set_logit_bias`) is
    added last: the task's base distribution p̃₀ ∝ exp(logits + b)."""
    # The head on a 2-D input: given a non-contiguous 3-D view (a slice of positions), a linear
    # layer on the CPU runs as a batched matmul that first copies the [V, d] weight once per row
    # (measured on SmolLM2 infilling: most of an update's time in bfloat16, less in float32;
    # docs/results/bench_smollm2_head_rows_cpu.md).
    x = base.get_output_embeddings()(h.reshape(-1, h.shape[-1])).float()
    x = x.view(*h.shape[:-1], x.shape[-1])
    scale = _config_number(base.config, "logit_scale")
    if scale is not None:
        x = x * scale
    divisor = _config_number(base.config, "logits_scaling")
    if divisor is not None:
        x = x / divisor
    cap = _config_number(base.config, "final_logit_softcapping")
    if cap is not None and cap > 0:
        x = torch.tanh(x / cap) * cap
    bias = getattr(base, LOGIT_BIAS, None)
    if bias is not None:  # a task's logit bias (set_logit_bias); absent: the model's own logits
        x = x + bias.to(x.device)
    return x


# the attribute of a causal LM that holds a task's logit bias [V] (a plain attribute, not a
# buffer: it is not a parameter of the model and stays out of checkpoints)
LOGIT_BIAS = "smclm_logit_bias"


def set_logit_bias(lm: nn.Module, bias: Tensor | None) -> None:
    """Make :func:`output_logits` of the causal LM ``lm`` add ``bias`` [V] (None: remove it)."""
    if bias is None:
        if LOGIT_BIAS in lm.__dict__:
            del lm.__dict__[LOGIT_BIAS]
        return
    if bias.shape != (vocab_size(lm),):
        raise ValueError(
            f"a logit bias of shape {tuple(bias.shape)} does not fit the model's "
            f"{vocab_size(lm)} logits"
        )
    object.__setattr__(
        lm, LOGIT_BIAS, bias.detach().float().to(lm.get_output_embeddings().weight.device)
    )


def vocab_size(base: nn.Module) -> int:
    """V, the size of the LM's output distribution (the output head's rows)."""
    return int(base.get_output_embeddings().weight.shape[0])


def hidden_dim(base: nn.Module) -> int:
    """The width of the body's last hidden states: the output head's input (this differs from
    ``hidden_size`` where the body projects out, as OPT-350m does)."""
    return int(base.get_output_embeddings().weight.shape[1])


@torch.no_grad()
def check_output_head(base: nn.Module, what: str) -> None:
    """Refuse (ValueError, one line) a causal LM whose logits are not :func:`output_logits` of
    its body's last hidden state, on a probe of a few tokens: the sampler reads p₀ that way."""
    param = next(base.parameters())
    try:
        ids = (torch.arange(4, device=param.device) * 7 % vocab_size(base))[None]
        ours = output_logits(base, base.base_model(input_ids=ids).last_hidden_state)
        theirs = base(input_ids=ids).logits.float()
    except Exception as e:  # a body without last_hidden_state, a head of another shape, …
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{what}: its body and output head cannot be run apart ({type(e).__name__}: "
            f"{first}); "
            "smclm needs a causal LM whose logits are its head on its body's last hidden state"
        ) from e
    gap = float((ours.log_softmax(-1) - theirs.log_softmax(-1)).abs().max())
    # the model's own logits are rounded to its dtype (bf16: 2⁻⁸ relative), ours are float32
    eps = torch.finfo(param.dtype).eps if param.dtype.is_floating_point else 1e-2
    tol = 1e-3 + 8 * eps * float(theirs.abs().max())
    if not gap <= tol:
        raise ValueError(
            f"{what}: its forward transforms the logits after the output head in a way smclm "
            f"does not know (log p₀ differs by {gap:.3g} on a probe), so p₀ would be wrong; "
            f"this architecture ({type(base).__name__}) is not supported"
        )


# log-probs of given tokens are computed over at most this many logits at a time (float32:
# 128 MiB, about three times that at the peak), whatever the number of rows
TOKEN_LOGITS_BUDGET = 1 << 25


def token_log_probs(
    base: nn.Module, h: Tensor, targets: Tensor, budget: int | None = None
) -> Tensor:
    """log p₀(targets) [N, L] (float32) from the base's last hidden states h [N, L, d] (see
    :func:`output_logits`), without holding [N, L, V] logits at once: rows go through the head
    in chunks of at most ``budget`` logits (at least one row; default ``TOKEN_LOGITS_BUDGET``)."""
    budget = TOKEN_LOGITS_BUDGET if budget is None else budget
    n, length = targets.shape
    rows = max(1, budget // max(1, length * vocab_size(base)))
    out = []
    for i in range(0, n, rows):
        logits = output_logits(base, h[i : i + rows])
        picked = logits.gather(-1, targets[i : i + rows, :, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else h.new_zeros((0, length), dtype=torch.float32)


@dataclass
class StepDists:
    """Next-token quantities for all particles: log p₀ [N, V], log ψ [N, V] (None: ψ ≡ 1) and the
    proposal log q [N, V] when a policy defines it (None: q ∝ p₀·ψ)."""

    log_p0: Tensor
    log_psi: Tensor | None
    log_q: Tensor | None = None


@dataclass
class ToolState:
    """Each particle's generated tokens so far [N, t] and its queue of forced tokens [N, Q]
    (−1: empty), while sampling with a tool; ``triggers`` the tool's trigger ids on the
    sampler's device (made once per run, not per step)."""

    history: Tensor
    queue: Tensor
    triggers: Tensor

    def front(self) -> Tensor:
        """[N] the token each particle is forced to take next (−1: none)."""
        if self.queue.shape[1] == 0:
            return self.queue.new_full((self.queue.shape[0],), -1)
        return self.queue[:, 0]


@dataclass
class SamplingContext:
    cache: Any
    twist_state: Any
    n: int
    policy_state: Any = None
    tool_state: ToolState | None = None


# the attribute of a causal LM that holds a task's tool (as LOGIT_BIAS: not a parameter)
TOOL = "smclm_tool"


def force(log_p: Any, targets: Tensor | None) -> Any:
    """log_p [..., V] made one-hot (0 on the target, −inf elsewhere) where ``targets`` [...]
    (long) is ≥ 0: the tool's forced steps. The same tensor when nothing is forced (or log_p is
    None)."""
    if targets is None or log_p is None:
        return log_p
    hit = targets >= 0
    if not bool(hit.any()):
        return log_p
    one_hot = torch.full_like(log_p, -torch.inf).scatter(
        -1, targets.clamp(min=0).unsqueeze(-1), 0.0
    )
    return torch.where(hit.unsqueeze(-1), one_hot, log_p)


class TwistedLM(nn.Module):
    """A frozen causal LM (any ``AutoModelForCausalLM``) together with an optional twist."""

    def __init__(
        self, base: nn.Module, twist: nn.Module | None = None, policy: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        self.twist = twist
        self.policy = policy

    def trainables(self) -> nn.ModuleDict:
        """The trained modules (twist and/or policy), keyed by name: what checkpoints hold."""
        mods = {k: m for k, m in (("twist", self.twist), ("policy", self.policy)) if m is not None}
        return nn.ModuleDict(mods)

    # -- pieces of the base model -------------------------------------------------------------
    @property
    def body(self) -> nn.Module:
        return self.base.base_model

    @property
    def vocab_size(self) -> int:
        return vocab_size(self.base)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def set_logit_bias(self, bias: Tensor | None) -> None:
        """A task's logit bias b [V] on every causal LM here whose logits are p₀ or a policy's
        (the base, a full/LoRA policy's copy): log p₀ becomes log_softmax(logits + b)."""
        for m in self.modules():
            get_head = getattr(m, "get_output_embeddings", None)
            if callable(get_head) and get_head() is not None and m is not self:
                set_logit_bias(m, bias)

    def set_tool(self, tool: Any) -> None:
        """A task's tool (None: remove it), held by the base LM so that every view of it
        (``with_twist``) forces the same steps."""
        if tool is None:
            self.base.__dict__.pop(TOOL, None)
        else:
            object.__setattr__(self.base, TOOL, tool)

    @property
    def tool(self) -> Any:
        return self.base.__dict__.get(TOOL)

    def forced_targets(self, tokens: Tensor) -> Tensor | None:
        """[N, T] the token the tool forces at each step of tokens [N, T] (−1: a policy step);
        None without a tool."""
        tool = self.tool
        return None if tool is None else tool.forced_targets(tokens)

    def log_p0_from_hidden(self, h: Tensor) -> Tensor:
        """log p₀ (float32) from the base body's hidden states [..., d]."""
        return F.log_softmax(output_logits(self.base, h), dim=-1)

    def with_twist(self, twist: nn.Module | None, keep_policy: bool = False) -> TwistedLM:
        """The same base model with another twist (no copy of the base); the policy is dropped
        unless keep_policy (``with_twist(None)`` is plain p₀)."""
        return TwistedLM(self.base, twist, self.policy if keep_policy else None)

    def policy_log_q(self, log_p0: Tensor, logits: Tensor) -> Tensor:
        """log q from log p₀ and the policy's logits (residual or not), float32."""
        x = log_p0 + logits.float() if getattr(self.policy, "residual", True) else logits.float()
        return F.log_softmax(x, dim=-1)

    # -- incremental sampling -----------------------------------------------------------------
    @torch.no_grad()
    def start(
        self, prompt_ids: Tensor, n: int, cond: Tensor | None = None
    ) -> tuple[SamplingContext, StepDists]:
        """Run the prompt [P] once and return the distributions of s_1 for n particles.

        cond: optional conditioning tokens o [n, c] (one row per particle).
        """
        from smclm.models.cache import make_kv_cache

        if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
            raise ValueError("the prompt must be a non-empty 1-D tensor of token ids")
        ids = prompt_ids[None].to(self.device)
        cache = make_kv_cache()
        h = self.body(input_ids=ids, **cache_kwargs(self.body, cache)).last_hidden_state
        reorder_cache(cache, torch.zeros(n, dtype=torch.long, device=ids.device))
        log_p0 = self.log_p0_from_hidden(h[:, -1]).expand(n, -1)
        twist_state, log_psi, policy_state, log_q = None, None, None, None
        if self.twist is not None:
            twist_state, log_psi = self.twist.begin(ids, h, n, cond)
        if self.policy is not None:
            policy_state, logits = self.policy.begin(ids, h, n, cond)
            log_q = self.policy_log_q(log_p0, logits)
        tool_state = None
        if self.tool is not None:  # the first step is never forced
            empty = torch.zeros(n, 0, dtype=torch.long, device=ids.device)
            triggers = torch.tensor(self.tool.trigger_ids, device=ids.device)
            tool_state = ToolState(empty, empty.clone(), triggers)
        ctx = SamplingContext(cache, twist_state, n, policy_state, tool_state)
        return ctx, StepDists(log_p0, log_psi, log_q)

    @torch.no_grad()
    def advance(self, ctx: SamplingContext, tokens: Tensor) -> StepDists:
        """Feed one token per particle (tokens [N]) and return the next distributions."""
        h = self.body(input_ids=tokens[:, None], **cache_kwargs(self.body, ctx.cache))
        h = h.last_hidden_state
        log_psi, log_q = None, None
        log_p0 = self.log_p0_from_hidden(h[:, -1])
        if self.twist is not None:
            log_psi = self.twist.advance(ctx.twist_state, tokens, h)
        if self.policy is not None:
            log_q = self.policy_log_q(log_p0, self.policy.advance(ctx.policy_state, tokens, h))
        if ctx.tool_state is not None:
            targets = self._advance_tool(ctx.tool_state, tokens)
            log_p0, log_q = force(log_p0, targets), force(log_q, targets)
        return StepDists(log_p0, log_psi, log_q)

    def _advance_tool(self, st: ToolState, tokens: Tensor) -> Tensor | None:
        """Record tokens [N] in the tool state and return the next forced token of each
        particle [N] (−1: none; None when no particle is forced)."""
        tool = self.tool
        was_forced = st.front() >= 0
        st.history = torch.cat([st.history, tokens[:, None]], dim=1)
        if st.queue.shape[1]:
            st.queue = st.queue[:, 1:]
        trig = torch.isin(tokens, st.triggers)
        rows = (trig & ~was_forced).nonzero().squeeze(1).tolist()
        t = st.history.shape[1]
        for r in rows:
            ins = tool.insertion(st.history[r].tolist())
            if not tool.fits(t, len(ins)):
                continue
            if st.queue.shape[1] < len(ins):
                pad = st.queue.new_full((st.queue.shape[0], len(ins) - st.queue.shape[1]), -1)
                st.queue = torch.cat([st.queue, pad], dim=1)
            st.queue[r, : len(ins)] = torch.tensor(ins, device=st.queue.device)
        if st.queue.shape[1] and not bool((st.queue[:, 0] >= 0).any()):
            st.queue = st.queue[:, :0]  # nothing queued: drop the empty columns
        return st.front() if st.queue.shape[1] else None

    @torch.no_grad()
    def reorder(self, ctx: SamplingContext, ancestors: Tensor) -> None:
        """Particle i continues particle ancestors[i]: reorder every cache in place."""
        reorder_cache(ctx.cache, ancestors)
        if self.twist is not None:
            self.twist.reorder(ctx.twist_state, ancestors)
        if self.policy is not None:
            self.policy.reorder(ctx.policy_state, ancestors)
        if ctx.tool_state is not None:
            st = ctx.tool_state
            st.history, st.queue = st.history[ancestors], st.queue[ancestors]

    # -- teacher-forced pass --------------------------------------------------------------------
    def base_pass(self, prompt_ids: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, int]:
        """The frozen base over [prompt, s_1..s_{T-1}] for tokens [N, T], without gradients:
        (input ids [N, P+T-1], hidden states [N, P+T-1, d], start = P-1, the position of s_1's
        logits). The prompt, shared by every row, goes through the body once; the N rows
        continue from its KV cache (as the sampler's do), so a row costs T-1 positions, not
        P+T-1."""
        from smclm.models.cache import prompt_shared_hidden

        prompt = prompt_ids.to(tokens.device)
        ids = torch.cat([prompt[None].expand(tokens.shape[0], -1), tokens[:, :-1]], dim=1)
        h = prompt_shared_hidden(self.body, prompt, tokens[:, :-1])
        return ids, h, prompt.numel() - 1

    def full_pass(
        self, prompt_ids: Tensor, tokens: Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """log p₀ [N, T, V] (no grad), log ψ [N, T, V] of the twist and log q [N, T, V] of the
        policy (with grad; None for what the model lacks), from ONE pass of the base."""
        ids, h, start = self.base_pass(prompt_ids, tokens)
        targets = self.forced_targets(tokens)
        with torch.no_grad():
            log_p0 = force(self.log_p0_from_hidden(h[:, start:]), targets)
        log_psi = None if self.twist is None else self.twist.full(ids, h, start, cond)
        log_q = None
        if self.policy is not None:
            log_q = self.policy_log_q(log_p0, self.policy.full(ids, h, start, cond))
            log_q = force(log_q, targets)
        return log_p0, log_psi, log_q

    def forward_full(
        self, prompt_ids: Tensor, tokens: Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One pass over [prompt, s_1..s_{T-1}] for N sequences tokens [N, T].

        Returns log p₀(s_t = · | s_<t) [N, T, V] (no grad) and log ψ_t(s_<t, ·) [N, T, V]
        (with grad through the twist's parameters; None when there is no twist).
        """
        ids, h, start = self.base_pass(prompt_ids, tokens)
        with torch.no_grad():
            log_p0 = force(self.log_p0_from_hidden(h[:, start:]), self.forced_targets(tokens))
        log_psi = None if self.twist is None else self.twist.full(ids, h, start, cond)
        return log_p0, log_psi

    def policy_full(
        self, prompt_ids: Tensor, tokens: Tensor, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced log p₀ [N, T, V] (no grad) and the policy's log q [N, T, V] (with grad
        through the policy), from one base pass plus the policy's own pass."""
        if self.policy is None:
            raise ValueError("policy_full needs a policy")
        ids, h, start = self.base_pass(prompt_ids, tokens)
        targets = self.forced_targets(tokens)
        with torch.no_grad():
            log_p0 = force(self.log_p0_from_hidden(h[:, start:]), targets)
        log_q = self.policy_log_q(log_p0, self.policy.full(ids, h, start, cond))
        return log_p0, force(log_q, targets)

    def sequence_log_probs(
        self,
        prompt_ids: Tensor,
        tokens: Tensor,
        cond: Tensor | None = None,
        proposal: str = "twist",
    ) -> dict[str, Tensor]:
        """Per-step gathers at the sampled tokens, all [N, T]: log p₀, log ψ_t and log q_t.

        With a policy, log q is the policy's (proposal="twist") and log ψ the twist's, if any."""
        log_p0, log_psi = self.forward_full(prompt_ids, tokens, cond)
        idx = tokens[..., None]
        out = {"log_p0": log_p0.gather(-1, idx).squeeze(-1)}
        if self.policy is not None and proposal != "p0":
            _, log_q = self.policy_full(prompt_ids, tokens, cond)
            out["log_q"] = log_q.gather(-1, idx).squeeze(-1)
        elif log_psi is None or proposal == "p0":
            out["log_q"] = out["log_p0"]
        else:
            out["log_q"] = F.log_softmax(log_p0 + log_psi, dim=-1).gather(-1, idx).squeeze(-1)
        if log_psi is not None:
            out["log_psi"] = log_psi.gather(-1, idx).squeeze(-1)
        return out
