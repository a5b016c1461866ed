"""Latent-variable inference: a rationale Z between a question X and an answer Y (Hu et al., ICLR
2024, §4.2–4.4; ``../shared/docs/gfn-paper-spec.md`` §2–4).

Data: rows (x, y[, z]) read from JSONL files (one JSON object a line: ``x`` text, ``y`` an int or
a text, optional ``z`` text or null; other keys are kept and ignored; :func:`load_rows`), or
``arithmetic``: the integer-arithmetic data that smclm generates with a fixed seed
(:mod:`smclm.tasks.arithmetic_data`; no download). ``task.data`` gives the training rows,
``task.test_data`` the test rows (``task.split`` picks which the task conditions on).

The policy's prompt is ``task.prompt_template`` with ``{x}``; Z is sampled after it and stops at
a stop token (``task.stop``, default ``eos``: the tokenizer's EOS) within ``task.min_len`` …
``task.output_len`` tokens (the stop counted, README "Stopping"). The reward is the base LM's
probability of the rationale followed by the answer text Y = ``task.answer_template`` with
``{y}``:

    log R(Z) = log p̃₀(Z' | C, X) + log p₀(Y | C, X, Z'),     σ(Z | X, Y) ∝ R(Z)^{1/τ},

where Z' is Z without its stop (the paper drops the stop and appends Y; ``task.score_stop=true``
keeps it), C is ``task.reward_prompt`` (e.g. k worked examples; empty by default) placed before
X in the reward's context only, and p̃₀ is p₀ with the task's logit bias: ``task.allowed``, when
set, is a string of characters, and every token whose text is not made only of them (spaces and
the tokenizer's space markers ignored) gets ``task.penalty`` added to its logit (the paper's
−99 restriction), at rationale positions only, for the reward and the sampler alike (the task's
:attr:`~smclm.tasks.base.Task.logit_bias`); the answer Y is scored by the unbiased p₀. The stop
tokens are never penalised.

The sampler's target is σ̃(Z) = p̃₀(Z | X)·φ(Z), so the potential is

    log φ(Z) = (1/τ)·log R(Z) − log p̃₀(Z | X)

(:class:`LatentPotential`): one teacher-forced pass over [X, Z', Y] when C is empty (the stop's
probability is read at the position where Y starts), two passes otherwise.

``task.k_shot`` = k > 0 puts the first k labelled training rows, worked (x, z, y in the templates,
one a line), before every policy prompt: k-shot prompting, whose baseline is ``smclm eval`` with
``evaluator.sampler=p0``; the reward's context stays C, X, so σ does not change.

``task.prompt_index=all`` (split train) trains on every training row, one drawn per update
(:meth:`smclm.tasks.base.Task.for_prompt` rebinds the potential to that row's answer). The
labelled training rows' z (``task.z_template`` with ``{z}``, default " {z}", then the stop) are
the task's demonstrations: ``method=gfn method.buffer.seed_with_task=true`` seeds the replay
buffer with them. The paper's reward-temperature schedule is GFlowNet's ``method.tau_r_*``
(with ``method.allow_tempered_target=true``). Evaluators of the test rows:
:mod:`smclm.evaluators.latent`.

``task.calculator=true`` puts the paper's calculator in the sampler
(:class:`smclm.tasks.calculator.CalculatorTool`, limited to ``task.calculator_terms`` operands,
2 as in the paper; null: no limit): after each generated "=" (or " =") token the value of the
expression before it follows as forced tokens, which are in the context and in the text the
reward scores, but not actions: their log p₀ and log q are 0 (the model's p₀ is the tool's, see
:mod:`smclm.models.twisted_lm`). So the sampler's target is σ̃(Z) = p̃₀(actions of Z | X)·φ(Z) with
log φ = (1/τ)·log R(Z) − Σ_{action steps} log p̃₀, and again σ ∝ R^{1/τ}. Tool tokens count in
``task.output_len``. With the tool, a labelled row's z is given with its results (``"6 - 0 = 6,
6 - 4 = 2"``, as in k-shot prompts); its demonstration is the policy's part (``"6 - 0 =, 6 - 4
="``: the text after each "=" up to the next ", " removed) with the tool's tokens inserted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.tasks.base import Task, choose_prompt, resolve_stop_ids
from smclm.tasks.plugin import TaskEnv

BUILTIN = ("arithmetic",)


def load_rows(source: str, split: str, **arithmetic: Any) -> list[dict[str, Any]]:
    """The rows of ``source``: a JSONL file (:func:`smclm.tasks.arithmetic_data.read_jsonl`'s
    format and checks), or ``arithmetic``: the generated data's training rows (labelled first,
    then unlabelled) for ``split="train"``, its ``test_operands`` test rows for ``"test"``."""
    from smclm.tasks import arithmetic_data

    if str(source) == "arithmetic":
        test_operands = int(arithmetic.pop("test_operands", 3))
        data = arithmetic_data.generate(**arithmetic, test_operands=(test_operands,))
        return data.labelled + data.unlabelled if split == "train" else data.test[test_operands]
    return arithmetic_data.read_jsonl(Path(str(source)).expanduser())


def allowed_token_bias(
    tokenizer: Any, vocab: int, allowed: str, penalty: float, keep: tuple[int, ...]
) -> Tensor:
    """b [V]: ``penalty`` on every token whose text, spaces and space markers (Ġ, ▁) removed, has
    a character outside ``allowed`` (an empty text counts as outside), 0 on the others and on
    ``keep`` (the stop tokens); ids beyond the tokenizer's vocabulary are penalised too."""
    from smclm.tasks.next_sentence import token_texts

    n = min(vocab, len(tokenizer))
    chars = set(allowed)
    bias = torch.full((vocab,), float(penalty))
    for i, text in enumerate(token_texts(tokenizer, n)):
        core = text.replace("Ġ", "").replace("▁", "").replace(" ", "")
        if core and set(core) <= chars:
            bias[i] = 0.0
    for i in keep:
        bias[i] = 0.0
    return bias


@dataclass
class _Row:
    context: Tensor  # [C + X] the reward's context: reward prompt then the policy prompt's text
    answer: Tensor  # [L_y] the answer text's ids
    others: tuple[Tensor, ...] = ()  # task.labels: the other labels' answer ids (label check)


def _cumulative(log_sm: Tensor, z: Tensor, skip: Tensor | None = None) -> Tensor:
    """Σ_{j ≤ i} log p(z_j | ·) for i = 0..T [g, T + 1] from log_sm [g, T + 1, V] (position j
    predicts z_j+1) of rows z [g, T]; ``skip`` [g, T] True: a step left out (a forced token)."""
    tok = log_sm[:, :-1].gather(-1, z[..., None]).squeeze(-1)
    if skip is not None:
        tok = tok.masked_fill(skip, 0.0)
    return torch.cat([tok.new_zeros(z.shape[0], 1), tok.cumsum(1)], 1)


class LatentPotential:
    """log φ(Z) = (1/τ)·log R(Z) − log p̃₀(Z | X) on finished sequences Z (module docstring).

    Bound to one policy prompt X (``prompt_ids``); ``rows`` maps every prompt's ids to its reward
    context and answer; :meth:`for_prompt` rebinds it."""

    def __init__(
        self,
        base: Any,
        prompt_ids: Tensor,
        rows: dict[tuple[int, ...], _Row],
        tau: float,
        bias: Tensor | None,
        score_stop: bool = False,
        batch_size: int = 64,
        test_rows: list[dict[str, Any]] | None = None,
        label_penalty: float | None = None,
    ) -> None:
        self.base, self.prompt_ids, self.rows = base, prompt_ids, rows
        self.test_rows = test_rows  # the test split's rows, in test_prompts' order (evaluators)
        self.label_penalty = label_penalty  # added to log R when p₀ prefers another label
        self.labels: list[str] | None = None  # task.labels, and their answer texts' ids
        self.label_ids: dict[str, Tensor] = {}
        self.demos: list[tuple[Tensor, list[int]]] = []  # (prompt ids, z ids) of labelled rows
        self.tau, self.bias, self.score_stop = float(tau), bias, bool(score_stop)
        self.batch_size = int(batch_size)
        self.tool: Any = None  # task.calculator: forced steps are not in log p̃₀(Z | X)
        self.row = rows[tuple(int(i) for i in prompt_ids.tolist())]

    def seed_sequences(self, output_len: int, pad_id: int) -> list[tuple[Tensor, Tensor]]:
        """The labelled training rows' z as finished sequences, grouped by prompt: (prompt ids,
        tokens [n, T] = z, its stop, the pad id after it); rows whose z and stop exceed T are
        left out."""
        groups: dict[tuple[int, ...], tuple[Tensor, list[list[int]]]] = {}
        for prompt_ids, z in self.demos:
            if len(z) > output_len:
                continue
            key = tuple(int(i) for i in prompt_ids.tolist())
            groups.setdefault(key, (prompt_ids, []))[1].append(z + [pad_id] * (output_len - len(z)))
        return [(p, torch.tensor(rows, dtype=torch.long)) for p, rows in groups.values()]

    def for_prompt(self, prompt_ids: Tensor) -> LatentPotential:
        key = tuple(int(i) for i in prompt_ids.tolist())
        if key not in self.rows:
            raise ConfigError("task=latent: a prompt that is not one of the task's rows")
        bound = LatentPotential(
            self.base,
            prompt_ids,
            self.rows,
            self.tau,
            self.bias,
            self.score_stop,
            self.batch_size,
            self.test_rows,
            self.label_penalty,
        )
        bound.demos, bound.labels, bound.label_ids = self.demos, self.labels, self.label_ids
        bound.tool = self.tool
        return bound

    def _log_probs(
        self, context: Tensor, seq: Tensor, raw_from: int, extra: tuple[int, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One teacher-forced pass over [context, seq]: log p̃₀ (biased logits) [N, L] of the
        tokens ``seq`` [N, L] after ``context`` [P], the raw (unbiased) log p₀ [N, L − raw_from]
        of seq[:, raw_from:] (the answer's tokens; L = raw_from: none), and with ``extra`` =
        (j, tokens [N]) log p̃₀ of those tokens in place of seq[:, j]."""
        from smclm.models.twisted_lm import output_logits

        h = self._hidden(context, seq)
        logits = output_logits(self.base, h)  # [N, L, V] float32, with the task's bias
        log_sm = logits.log_softmax(-1)
        biased = log_sm.gather(-1, seq[..., None]).squeeze(-1)
        other = None
        if extra is not None:
            j, tokens = extra
            other = log_sm[:, j].gather(-1, tokens[:, None]).squeeze(-1)
        if self.bias is None:
            return biased, biased[:, raw_from:], other
        tail = seq[:, raw_from:]
        raw_logits = logits[:, raw_from:] - self.bias.to(logits.device)
        raw = raw_logits.log_softmax(-1).gather(-1, tail[..., None]).squeeze(-1)
        return biased, raw, other

    def _hidden(self, context: Tensor, seq: Tensor) -> Tensor:
        """The base body's last hidden states [N, L, d] at the positions that predict seq [N, L]
        after context [P]. The context (the reward prompt's k worked examples and X: most of
        the tokens) runs once, its KV cache expanded to the N rows, instead of once per row."""
        from smclm.models.cache import prompt_shared_hidden

        h = prompt_shared_hidden(self.base.base_model, context, seq[:, :-1])
        return h[:, context.numel() - 1 :]

    @torch.no_grad()
    def prefix_log_phi(
        self, tokens: Tensor, terminable: Tensor, stop_ids: list[int]
    ) -> Tensor | None:
        """log φ(z_1:i v) [N, T, S] of "prefix + stop" for every terminable state (n, i)
        (``terminable`` [N, T], i = 0..T−1 the prefix length) and stop v (0 elsewhere): the value
        :meth:`__call__` gives each such sequence (GFlowNet's modified SubTB scores every prefix),
        with fewer passes: the reward context once, one pass over every row's z_1:T after it,
        then Y's tokens for all prefixes against that pass's KV cache, where the rows of prefix
        i see C, X and z_1:i only (an attention mask over the cache, positions continuing from
        i); with a policy context other than C, X, one more pass over [X, z_1:T]. None (the
        caller scores each sequence) with the label check (``task.labels``)."""
        if self.label_penalty is not None and self.row.others:
            return None
        dev = next(self.base.parameters()).device
        n = tokens.shape[0]
        out = torch.zeros(n, tokens.shape[1], len(stop_ids), device=tokens.device)
        stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        ctx = self.row.context.to(dev)
        same_context = torch.equal(ctx.cpu(), self.prompt_ids.cpu())
        forced = None if self.tool is None else self.tool.forced_targets(tokens).to(dev)
        reward_ctx = self._context_state(ctx)
        policy_ctx = None if same_context else self._context_state(self.prompt_ids.to(dev))
        group = max(1, self.batch_size // 4)  # rows per pass: [rows, T + 1, V] logits at once
        for a in range(0, n, group):
            rows = torch.arange(a, min(n, a + group), device=dev)
            z = tokens[a : a + group].to(dev)
            term = terminable[a : a + group].to(dev)
            if not bool(term.any()):
                continue
            logits, cache = self._prefix_pass(reward_ctx, z)
            log_sm = logits.log_softmax(-1)  # [g, T + 1, V]
            log_r = self._prefix_log_r(log_sm, cache, ctx.numel(), z, term, stops)  # [g, T, S]
            if policy_ctx is not None:
                log_sm = self._prefix_pass(policy_ctx, z)[0].log_softmax(-1)
            # the tool's tokens are not in p̃₀'s probability of Z
            cum = _cumulative(log_sm, z, None if forced is None else forced[rows] >= 0)
            log_p_z = cum[:, :-1, None] + log_sm[:, :-1].index_select(-1, stops)  # z_1:i v | X
            value = (log_r / self.tau - log_p_z).masked_fill(~term[..., None], 0.0)
            out[a : a + group] = value.float().to(out.device)
        return out

    def _context_state(self, context: Tensor) -> tuple[Tensor, Any]:
        """The last hidden state [1, d] of ``context`` [P] and its KV cache (one row)."""
        from smclm.models.cache import cache_kwargs, make_kv_cache

        body = self.base.base_model
        cache = make_kv_cache()
        h = body(input_ids=context[None], **cache_kwargs(body, cache)).last_hidden_state
        return h[:, -1], cache

    def _prefix_pass(self, context: tuple[Tensor, Any], z: Tensor) -> tuple[Tensor, Any]:
        """The biased logits [g, T + 1, V] after each prefix z_1:i (i = 0..T) of every row of z
        [g, T] after the context (:meth:`_context_state`), and the KV cache of [context, z]."""
        import copy

        from smclm.models.cache import cache_kwargs, reorder_cache
        from smclm.models.twisted_lm import output_logits

        body = self.base.base_model
        h_last, ctx_cache = context
        cache = copy.deepcopy(ctx_cache)
        reorder_cache(cache, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))
        h = body(input_ids=z, **cache_kwargs(body, cache)).last_hidden_state
        h = torch.cat([h_last[:, None].expand(z.shape[0], -1, -1), h], dim=1)
        return output_logits(self.base, h), cache

    def _prefix_log_r(
        self, log_sm: Tensor, cache: Any, p: int, z: Tensor, term: Tensor, stops: Tensor
    ) -> Tensor:
        """log R(z_1:i v) [g, T, S] at the terminable prefixes ``term`` [g, T] (0 elsewhere),
        from the reward context's pass over z (its biased log-softmax ``log_sm`` [g, T + 1, V]
        and ``cache``; the context is p tokens) and one pass of Y per prefix (per prefix and
        stop with ``task.score_stop``)."""
        import copy

        from smclm.models.cache import cache_kwargs, reorder_cache
        from smclm.models.twisted_lm import output_logits

        body = self.base.base_model
        g, t_len = z.shape
        s = stops.numel()
        cum = _cumulative(log_sm, z)  # log p̃₀(z_1:i | C, X)
        src0, states0 = term.nonzero(as_tuple=True)
        src, states = src0, states0
        k = states.numel()
        bias = None if self.bias is None else self.bias.to(log_sm.device)
        y = self.row.answer.to(z.device)
        if self.score_stop:  # the stop is in Z' (biased), then all of Y after it: rows (i, v)
            src, states = src.repeat_interleave(s), states.repeat_interleave(s)
            head = log_sm[src, states].gather(-1, stops.repeat(k)[:, None]).squeeze(-1)
            feed = torch.cat([stops.repeat(k)[:, None], y[None, :-1].expand(k * s, -1)], 1)
            targets = y[None].expand(k * s, -1)
        else:  # Y after z_1:i whatever the stop: its first token from the pass, rows (n, i)
            # unbiased: log-softmax is shift-invariant, so log_sm − bias renormalises like logits
            raw = log_sm[src, states] if bias is None else log_sm[src, states] - bias
            head = raw.log_softmax(-1)[:, y[0]]
            feed = y[None, :-1].expand(k, -1)
            targets = y[None, 1:].expand(k, -1)
        rest = torch.zeros_like(head)
        width = feed.shape[1]
        keys = torch.arange(p + t_len + width, device=z.device)[None]
        for a in range(0, src.numel() if width else 0, self.batch_size):
            b = slice(a, a + self.batch_size)
            i = states[b]
            c = cache if a + self.batch_size >= src.numel() else copy.deepcopy(cache)
            reorder_cache(c, src[b])
            seen = (keys < p + i[:, None]) | (keys >= p + t_len)  # C, X, z_1:i, and Y itself
            pos = p + i[:, None] + torch.arange(width, device=z.device)[None]
            h = body(
                input_ids=feed[b], attention_mask=seen.long(), position_ids=pos,
                **cache_kwargs(body, c),
            ).last_hidden_state  # fmt: skip
            lg = output_logits(self.base, h)
            lg = lg if bias is None else lg - bias  # Y unbiased
            rest[b] = lg.log_softmax(-1).gather(-1, targets[b, :, None]).squeeze(-1).sum(1)
        total = (head + rest).view(-1, s) if self.score_stop else (head + rest)[:, None]
        out = torch.zeros(g, t_len, s, device=log_sm.device)
        out[src0, states0] = cum[src0, states0, None] + total
        return out

    def answer_log_probs(self, zs: Tensor, answers: list[Tensor]) -> Tensor:
        """Raw log p₀ of each answer text (ids [L_a]) after [C, X, Z′] for rationales zs
        [N, k] (without their stop): [N, len(answers)], one pass per answer."""
        ctx = self.row.context.to(zs.device)
        out = []
        for ans in answers:
            seq = torch.cat([zs, ans.to(zs.device)[None].expand(zs.shape[0], -1)], dim=1)
            out.append(self._log_probs(ctx, seq, zs.shape[1])[1].sum(1))
        return torch.stack(out, dim=1)

    def _prefers_another(self, zs: Tensor, true_raw: Tensor) -> Tensor:
        """1.0 where p₀ scores another label's answer text above the row's own after
        [C, X, Z'] (the subjectivity reward's label check), else 0.0 [N]."""
        others = self.answer_log_probs(zs, list(self.row.others))
        return (others > true_raw.sum(1)[:, None]).any(1).float()

    @torch.no_grad()
    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        dev = next(self.base.parameters()).device
        ctx = self.row.context.to(dev)
        y = self.row.answer.to(dev)
        same_context = torch.equal(ctx.cpu(), self.prompt_ids.cpu())
        out = []
        for i in range(0, tokens.shape[0], self.batch_size):
            z = tokens[i : i + self.batch_size].to(dev)
            zs = z if self.score_stop else z[:, :-1]
            k = zs.shape[1]
            seq = torch.cat([zs, y[None].expand(z.shape[0], -1)], dim=1)
            # Z's stop, read where Y starts (the same context and prefix: the same hidden state)
            extra = (k, z[:, -1]) if same_context and not self.score_stop else None
            biased, raw, stop = self._log_probs(ctx, seq, k, extra)
            log_r = biased[:, :k].sum(1) + raw.sum(1)
            if self.label_penalty is not None and self.row.others:
                log_r = log_r + self.label_penalty * self._prefers_another(zs, raw)
            # the tool's forced steps are in R's text but not in p̃₀'s probability of Z
            acting = None if self.tool is None else self.tool.forced_targets(z) < 0
            if same_context:
                part = (
                    biased[:, :k]
                    if acting is None
                    else biased[:, :k].masked_fill(~acting[:, :k], 0.0)
                )
                log_p_z = part.sum(1) + (0.0 if stop is None else stop)
            else:  # the policy's context differs from the reward's: a second pass
                lp = self._log_probs(self.prompt_ids.to(dev), z, z.shape[1])[0]
                log_p_z = (lp if acting is None else lp.masked_fill(~acting, 0.0)).sum(1)
            out.append(log_r / self.tau - log_p_z)
        if not out:
            return tokens.new_zeros(0).float()
        return torch.cat(out).to(tokens.device).float()


def latent_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str | None,
    output_len: int,
    data: str = "arithmetic",
    test_data: str | None = None,
    max_train_rows: int | None = None,
    max_test_rows: int | None = None,
    split: str = "train",
    prompt_index: int | str = 0,
    prompt_template: str = "{x}",
    answer_template: str = "{y}",
    z_template: str = " {z}",
    k_shot: int = 0,
    reward_prompt: str = "",
    stop: Any = "eos",
    min_len: int = 1,
    tau: float = 1.0,
    allowed: str | None = None,
    penalty: float = -99.0,
    score_stop: bool = False,
    labels: list[Any] | None = None,
    label_penalty: float = -50.0,
    data_seed: int = 0,
    test_operands: int = 3,
    calculator: bool = False,
    calculator_terms: int | None = 2,
    cond_len: int = 0,
) -> Task:
    """The task of configs/task/latent.yaml (module docstring). ``prompt`` (the config's
    placeholder) is not used: the prompt is row ``prompt_index`` of ``split``."""
    from smclm.build import encode_prompt

    if cond_len:
        raise ConfigError(f"task.cond_len={cond_len}: task=latent conditions through its prompt")
    tau = float(tau)
    if not (tau > 0 and math.isfinite(tau)):
        raise ConfigError(f"task.tau={tau} must be a positive number (1: the untempered target)")
    gen = {"seed": int(data_seed), "test_operands": int(test_operands)}
    train_rows = load_rows(data, "train", **gen)
    if test_data is None and str(data) in BUILTIN:
        test_data = data
    test_rows = [] if test_data is None else load_rows(test_data, "test", **gen)
    for key, value in (("max_train_rows", max_train_rows), ("max_test_rows", max_test_rows)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigError(f"task.{key}={value!r}: give a positive integer, or null (all rows)")
    train_rows = train_rows[:max_train_rows]
    test_rows = test_rows[:max_test_rows]
    if not train_rows:
        raise ConfigError(f"task.data={data} has no rows; give a JSONL file of (x, y) rows")
    chosen = train_rows if split == "train" else test_rows
    picked = choose_prompt(len(chosen), split, prompt_index, "rows")
    every, index = picked is None, picked or 0
    if isinstance(k_shot, bool) or not isinstance(k_shot, int) or k_shot < 0:
        raise ConfigError(f"task.k_shot={k_shot!r}: a number of demonstrations, 0 or more")
    labelled = [r for r in train_rows if r.get("z") is not None]
    if k_shot > len(labelled):
        raise ConfigError(
            f"task.k_shot={k_shot}: the training rows hold only {len(labelled)} with a z"
        )
    # k-shot prompting: the first k labelled rows, worked, before the policy's prompt
    shots = "".join(
        prompt_template.format(x=r["x"])
        + z_template.format(z=r["z"])
        + answer_template.format(y=r["y"])
        + "\n"
        for r in labelled[:k_shot]
    )
    tok = env.tokenizer
    if stop == "eos":
        if getattr(tok, "eos_token_id", None) is None:
            raise ConfigError("task.stop=eos: this tokenizer has no EOS token; name a stop token")
        stop_ids: tuple[int, ...] = (int(tok.eos_token_id),)
    else:
        stop_ids = resolve_stop_ids(tok, stop, env.vocab_size)
    if not stop_ids:
        raise ConfigError("task.stop must name the stop token(s) of Z (default eos)")

    tool = None
    if calculator:
        from smclm.tasks.calculator import CalculatorTool

        if calculator_terms is not None and (
            isinstance(calculator_terms, bool)
            or not isinstance(calculator_terms, int)
            or calculator_terms < 2
        ):
            raise ConfigError(
                f"task.calculator_terms={calculator_terms!r}: give an integer ≥ 2 (the paper: 2), "
                "or null (no limit)"
            )
        tool = CalculatorTool(tok, env.vocab_size, int(output_len), calculator_terms)

    def demo_ids(z: str) -> list[int]:
        """A labelled z as the policy's token ids (with the tool: its part, then completed)."""
        if tool is None:
            return list(tok(z_template.format(z=z), add_special_tokens=False)["input_ids"])
        from smclm.tasks.arithmetic_data import tool_form

        text = z_template.format(z=tool_form(z))
        pieces = [p for p in re.split(r"(?<==)", text) if p]  # each "=" ends a piece
        return tool.complete([tok(p, add_special_tokens=False)["input_ids"] for p in pieces])

    table: dict[tuple[int, ...], _Row] = {}
    label_list = None if labels is None else [str(v) for v in labels]
    if label_list is not None and len(set(label_list)) < 2:
        raise ConfigError(f"task.labels={labels}: give at least two distinct labels, or null")

    def answer_ids(y: Any) -> Tensor:
        return torch.tensor(tok(answer_template.format(y=y), add_special_tokens=False)["input_ids"])

    demos: list[tuple[Tensor, list[int]]] = []  # labelled training rows: (prompt ids, z ids)

    def encode(rows: list[dict[str, Any]], where: str) -> tuple[Tensor, ...]:
        out = []
        for j, row in enumerate(rows):
            try:
                x_text = prompt_template.format(x=row["x"])
                y_text = answer_template.format(y=row["y"])
            except (KeyError, IndexError) as e:
                raise ConfigError(
                    f"task.prompt_template / answer_template: unknown field {e}; use {{x}} and {{y}}"
                ) from None
            try:
                ids = encode_prompt(tok, shots + x_text, bos=True)
                ctx = encode_prompt(tok, reward_prompt + x_text, bos=True)
            except ConfigError as e:
                raise ConfigError(
                    f"{where} row {j + 1}: the prompt (task.prompt_template with x"
                    f"{', after task.reward_prompt' if reward_prompt else ''}) cannot be "
                    f"tokenised: {e}"
                ) from None
            key = tuple(int(i) for i in ids.tolist())
            answer = answer_ids(row["y"])
            if answer.numel() == 0:
                raise ConfigError(f"{where} row {j + 1}: the answer text {y_text!r} is empty")
            known = table.get(key)
            if known is not None and not torch.equal(known.answer, answer):
                raise ConfigError(
                    f"{where} row {j + 1}: x={row['x']!r} appears with two different answers; "
                    "each question must have one answer"
                )
            others: tuple[Tensor, ...] = ()
            if label_list is not None:
                if str(row["y"]) not in label_list:
                    raise ConfigError(
                        f"{where} row {j + 1}: y={row['y']!r} is not one of task.labels="
                        f"{label_list}; list every label, or set task.labels=null"
                    )
                others = tuple(answer_ids(v) for v in label_list if v != str(row["y"]))
            table[key] = _Row(ctx, answer, others)
            if row.get("z") is not None and where.startswith("task.data"):
                demos.append((ids, demo_ids(str(row["z"]))))
            out.append(ids)
        return tuple(out)

    encoded = {"train": encode(train_rows, f"task.data={data}")}
    encoded["test"] = encode(test_rows, f"task.test_data={test_data}")
    prompt_ids = encoded[split][0 if every else index]
    bias = None
    if allowed:
        bias = allowed_token_bias(tok, env.vocab_size, str(allowed), float(penalty), stop_ids)
        bias = bias.to(env.device)
    potential = LatentPotential(
        env.base,
        prompt_ids,
        table,
        tau,
        bias,
        bool(score_stop),
        test_rows=test_rows,
        label_penalty=None if label_list is None else float(label_penalty),
    )
    potential.demos = [(ids, z + [stop_ids[0]]) for ids, z in demos]
    potential.tool = tool
    if label_list is not None:  # evaluator=label_vote scores each label's answer text
        potential.labels = label_list
        potential.label_ids = {v: answer_ids(v) for v in label_list}
    return Task(
        name,
        prompt_ids,
        int(output_len),
        potential,
        log_phi_max=None,
        stop_ids=stop_ids,
        min_len=int(min_len),
        logit_bias=bias,
        tool=tool,
        train_prompts=encoded["train"] if every else (prompt_ids,),
        test_prompts=encoded["test"],
    )
