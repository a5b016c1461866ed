"""Twist functions: networks that return log ψ_t(s_<t, v) for all V next tokens at once.

A twist reads the same positions as the base LM's next-token logits (paper-spec §0): the hidden
state at buffer position P+t-2 gives log p₀(s_t = · | s_<t) and log ψ_t(s_<t, ·). Three kinds:

* ``HeadTwist``      a linear or MLP head on the *frozen* base model's final hidden state.
* ``SeparateTwist``  a trainable copy of the base body (initialised from p₀) with a head; it keeps
                     its own KV cache during sampling.
* ``TabularTwist``   a lookup table indexed by the output prefix (the exact ψ* of the toy world).

Every twist may take conditioning tokens o [N, c] (infilling). Their encoding g(o) — the last
hidden state of a body run on o alone — is computed once per sampling run and concatenated to the
hidden state before the head (paper-spec §2).

Interface used by :class:`smclm.models.twisted_lm.TwistedLM`:
``begin(prompt_ids, base_hidden, cond) -> (state, log_psi [N, V])``,
``advance(state, tokens, base_hidden) -> log_psi [N, V]``, ``reorder(state, ancestors)``,
``full(input_ids, base_hidden, start, cond) -> log_psi [N, T, V]`` (teacher-forced, with grad).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smclm.models.cache import cache_kwargs, reorder_cache


def _paper_init(layer: nn.Linear, scale: float = 1.0) -> None:
    """W ~ N(0, 2/(fan_in+fan_out)) (Glorot normal, the reference's `linear_init_normal`), b = 0."""
    std = scale * (2.0 / (layer.in_features + layer.out_features)) ** 0.5
    nn.init.normal_(layer.weight, 0.0, std)
    nn.init.zeros_(layer.bias)


OUTPUTS = ("vocab", "embedding")


def scaled_embedding(embedding: Tensor) -> Tensor:
    """The output embeddings [V, d_e] as float32, divided by their mean L1 norm (1/V Σ_v ‖e_v‖₁).

    Adam moves every weight of the last layer by about lr per step whatever its gradient's size,
    so one step moves u by up to lr·‖x‖₁ per coordinate and log ψ(v) = u · e_v by up to
    lr·‖x‖₁·‖e_v‖₁. With unit-L1 embeddings on average that bound is lr·‖x‖₁, the same as a
    V-wide (vocab) head's, so the learning rates of the two heads mean the same thing. Unscaled,
    SmolLM2's embeddings (‖e_v‖₁ ≈ 60) made the first Adam step at lr 1e-3 move log ψ by ~10
    nats and throw q far from p₀ (docs/results/table8_smollm2_cpu.md). A constant factor: what
    the head can represent is unchanged."""
    emb = embedding.detach().float()
    return emb / emb.abs().sum(1).mean().clamp_min(1e-12)


class Head(nn.Module):
    """Maps hidden states [..., d_in] to log ψ [..., V].

    kind="linear": one Linear. kind="mlp": Linear(d_in→m·d_in)–ReLU–[Linear–ReLU]×(L−2)–Linear(→V),
    as the reference's `--hface_nn_twist` (L = n_layers = 3, m = hidden_mult = 1).
    The output layer starts at zero, so log ψ ≡ 0 and the twisted proposal equals p₀ exactly at
    the start (the paper's small-normal init gives log ψ ≈ 0; exact zero makes "untrained" mean
    "q = p₀"). squash="logsigmoid" returns log σ(head(h)) ∈ (−∞, 0), the FUDGE parameterisation.

    output="vocab" (the paper's): the last layer maps to V values. output="embedding" (ours):
    the last layer maps to the base LM's embedding width d_e and log ψ(v) = u · ê_v with ê_v the
    base's frozen output embedding of token v (``embedding`` [V, d_e], not a parameter, not
    saved) divided by the mean L1 norm of the embeddings (:func:`scaled_embedding`): the head
    learns d_e·d_in weights instead of V·d_in, and what it learns about one token carries over
    to tokens the LM embeds nearby.
    """

    def __init__(
        self,
        d_in: int,
        vocab_size: int,
        kind: str = "mlp",
        hidden_mult: int = 1,
        n_layers: int = 3,
        squash: str | None = None,
        output: str = "vocab",
        embedding: Tensor | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"unknown twist head kind '{kind}'; choose linear or mlp")
        if output not in OUTPUTS:
            raise ValueError(f"unknown twist output '{output}'; choose {' or '.join(OUTPUTS)}")
        if output == "embedding" and (embedding is None or embedding.shape[0] != vocab_size):
            raise ValueError("twist.output=embedding needs the base LM's output embedding [V, d]")
        # Kept out of the module tree (frozen, owned by the base LM); a float32 copy, made once.
        self._embedding = [None if output == "vocab" else scaled_embedding(embedding)]
        if squash not in (None, "none", "logsigmoid"):
            raise ValueError(f"unknown twist squash '{squash}'; choose none or logsigmoid")
        self.squash = None if squash in (None, "none") else squash
        layers: list[nn.Module] = []
        if kind == "mlp":
            width = d_in * hidden_mult
            dims = [d_in] + [width] * (n_layers - 1)
            for a, b in zip(dims[:-1], dims[1:]):
                lin = nn.Linear(a, b)
                _paper_init(lin)
                layers += [lin, nn.ReLU()]
            last_in = dims[-1]
        else:
            last_in = d_in
        width_out = vocab_size if output == "vocab" else int(embedding.shape[1])  # type: ignore[union-attr]
        out = nn.Linear(last_in, width_out)
        _paper_init(out, scale=0.0)
        layers.append(out)
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        x = self.net(h.to(self.net[-1].weight.dtype)).float()
        emb = self._embedding[0]
        if emb is not None:
            if emb.device != x.device:
                emb = self._embedding[0] = emb.to(x.device)
            x = x @ emb.T  # the last layer's bias b adds b·e_v: a learned per-token offset
        return F.logsigmoid(x) if self.squash == "logsigmoid" else x


@dataclass
class TwistState:
    """Per-run twist state: conditioning encoding, own KV cache, or prefix index."""

    cond_h: Tensor | None = None  # [N, d_c]
    cache: Any = None
    prefix_index: Tensor | None = None  # [N] (TabularTwist)
    extra: dict = field(default_factory=dict)


def _concat_cond(h: Tensor, cond_h: Tensor | None) -> Tensor:
    """Head input: h [..., d] alone, or concat(h, g(o)) with g(o) [N, d_c] broadcast over time."""
    if cond_h is None:
        return h
    if cond_h.dim() == h.dim() - 1:
        cond_h = cond_h.unsqueeze(-2).expand(*h.shape[:-1], cond_h.shape[-1])
    return torch.cat([h.to(cond_h.dtype), cond_h], dim=-1)


def _first_step_head(head: Head, h: Tensor, n: int, cond_h: Tensor | None, cond: Tensor | None):
    """log ψ_1 [n, V] from the prompt's last hidden state h [1, d]: every particle shares it, so
    the head runs once, or once per distinct conditioning row (the particles of one SMC run
    share their o), not once per particle."""
    if cond_h is None or cond is None:
        return head(h).expand(n, -1)
    uniq, first = _distinct_rows(cond)
    x = _concat_cond(h.expand(len(first), -1), cond_h.index_select(0, first))
    return head(x).index_select(0, uniq)


def _distinct_rows(ids: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse [N], first [U]): row i of ids [N, c] equals row first[inverse[i]]."""
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), "amin")
    return inverse, first


def _last_hidden(body: nn.Module, ids: Tensor) -> Tensor:
    """Final hidden state at the last position of ``ids`` [N, c] → [N, d]. Equal rows (the
    particles of one SMC run share their o) go through the body once."""
    uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
    if uniq.shape[0] == ids.shape[0]:
        return body(input_ids=ids).last_hidden_state[:, -1]
    return body(input_ids=uniq).last_hidden_state[:, -1].index_select(0, inverse)


class HeadTwist(nn.Module):
    """A head on the frozen base model's final hidden state (1 forward pass gives p₀ and ψ).

    ``cond_body`` (the frozen base body) encodes conditioning tokens when the task has them.
    The body is frozen, so g(o) of an o never changes: each distinct o row goes through it once
    per run (a memo keyed by the row's tokens and the body's device and dtype), not once per
    sampler call and teacher-forced pass.
    """

    MEMO_ROWS = 65536  # distinct o rows kept (d floats each); the memo starts over beyond it

    def __init__(self, head: Head, cond_body: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        # Kept out of the module tree: it is the frozen base body, never trained or saved here.
        self._cond_body = [cond_body]
        self._memo: dict[tuple, Tensor] = {}  # (device, dtype, o row) -> g(o) [d_c], float32

    def encode_cond(self, cond: Tensor | None) -> Tensor | None:
        if cond is None:
            return None
        body = self._cond_body[0]
        if body is None:
            raise ValueError("this twist was built without a conditioning encoder")
        uniq, inverse = torch.unique(cond, dim=0, return_inverse=True)
        param = next(body.parameters())
        keys = [(param.device, param.dtype, *row) for row in uniq.tolist()]
        new = [i for i, key in enumerate(keys) if key not in self._memo]
        if new:
            if len(self._memo) + len(new) > self.MEMO_ROWS:
                self._memo.clear()
                new = list(range(len(keys)))
            with torch.no_grad():
                # a copy: a float32 body's slice would keep the whole [U, c, d] alive per row
                h = body(input_ids=uniq[new]).last_hidden_state[:, -1].float().clone()
            self._memo.update((keys[i], row) for i, row in zip(new, h.unbind(0)))
        return torch.stack([self._memo[key] for key in keys]).index_select(0, inverse)

    def begin(self, prompt_ids: Tensor, base_hidden: Tensor, n: int, cond: Tensor | None):
        state = TwistState(cond_h=self.encode_cond(cond))
        return state, _first_step_head(self.head, base_hidden[:, -1], n, state.cond_h, cond)

    def advance(self, state: TwistState, tokens: Tensor, base_hidden: Tensor) -> Tensor:
        return self.head(_concat_cond(base_hidden[:, -1], state.cond_h))

    def reorder(self, state: TwistState, ancestors: Tensor) -> None:
        if state.cond_h is not None:
            state.cond_h = state.cond_h[ancestors]

    def features(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        """The head's input at every output step (teacher-forced): [N, T, d (+ d_c)]."""
        return _concat_cond(base_hidden[:, start:], self.encode_cond(cond))

    def full(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        return self.head(self.features(input_ids, base_hidden, start, cond))


class SeparateTwist(nn.Module):
    """A trainable copy of the base body (initialised from p₀) plus a head (2 forward passes)."""

    def __init__(self, base_body: nn.Module, head: Head, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.body = copy.deepcopy(base_body).to(dtype)
        for p in self.body.parameters():
            p.requires_grad_(True)
        self.head = head

    def encode_cond(self, cond: Tensor | None) -> Tensor | None:
        return None if cond is None else _last_hidden(self.body, cond).float()

    def begin(self, prompt_ids: Tensor, base_hidden: Tensor, n: int, cond: Tensor | None):
        from smclm.models.cache import make_kv_cache

        cache = make_kv_cache()
        out = self.body(input_ids=prompt_ids, **cache_kwargs(self.body, cache))
        reorder_cache(cache, torch.zeros(n, dtype=torch.long, device=prompt_ids.device))
        state = TwistState(cond_h=self.encode_cond(cond), cache=cache)
        h = out.last_hidden_state[:, -1]
        return state, _first_step_head(self.head, h, n, state.cond_h, cond)

    def advance(self, state: TwistState, tokens: Tensor, base_hidden: Tensor) -> Tensor:
        out = self.body(input_ids=tokens[:, None], **cache_kwargs(self.body, state.cache))
        return self.head(_concat_cond(out.last_hidden_state[:, -1], state.cond_h))

    def reorder(self, state: TwistState, ancestors: Tensor) -> None:
        reorder_cache(state.cache, ancestors)
        if state.cond_h is not None:
            state.cond_h = state.cond_h[ancestors]

    def features(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        """The head's input at every output step (teacher-forced, own body): [N, T, d (+ d_c)]."""
        h = self.body(input_ids=input_ids).last_hidden_state[:, start:]
        return _concat_cond(h, self.encode_cond(cond))

    def full(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        return self.head(self.features(input_ids, base_hidden, start, cond))


class TabularTwist(nn.Module):
    """Twists given as tables over output prefixes: ``tables[t-1]`` is log ψ_t, shape [V^(t-1), V].

    The prefix s_<t is indexed in base V (s_1 most significant). Used for the exact optimal twist
    ψ* of the toy world, where Vᵀ sequences can be enumerated.
    """

    def __init__(self, tables: list[Tensor]) -> None:
        super().__init__()
        self.tables = [t.float() for t in tables]
        self.vocab_size = tables[0].shape[-1]

    def begin(self, prompt_ids: Tensor, base_hidden: Tensor, n: int, cond: Tensor | None):
        state = TwistState(prefix_index=torch.zeros(n, dtype=torch.long, device=prompt_ids.device))
        state.extra["t"] = 1
        return state, self.tables[0][state.prefix_index].to(prompt_ids.device)

    def advance(self, state: TwistState, tokens: Tensor, base_hidden: Tensor) -> Tensor:
        state.prefix_index = state.prefix_index * self.vocab_size + tokens
        state.extra["t"] += 1
        table = self.tables[state.extra["t"] - 1].to(tokens.device)
        return table[state.prefix_index]

    def reorder(self, state: TwistState, ancestors: Tensor) -> None:
        state.prefix_index = state.prefix_index[ancestors]

    def full(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        out_tokens = input_ids[:, start + 1 :]  # s_1 .. s_{T-1}
        n, t_minus_1 = out_tokens.shape
        index = torch.zeros(n, dtype=torch.long, device=input_ids.device)
        rows = [self.tables[0][index]]
        for t in range(t_minus_1):
            index = index * self.vocab_size + out_tokens[:, t]
            rows.append(self.tables[t + 1].to(index.device)[index])
        return torch.stack(rows, dim=1)
