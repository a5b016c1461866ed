"""A task: a prompt, an output length T and a potential log φ over full output sequences.

Potentials are plain callables ``log_phi(tokens [N, T], cond [N, c] | None) -> [N]`` (float32):
``tokens`` are the N output sequences as the LM's token ids (long, the prompt excluded, on the
sampler's device), ``cond`` the conditioning tokens o of each row (conditional tasks) or None.
log φ = −∞ (φ = 0) is allowed; NaN or +∞ is a :class:`smclm.errors.PotentialError`. A potential
over text decodes the ids itself (:mod:`smclm.tasks.text_scorer`, :mod:`smclm.tasks.classifier`).
Tasks are made by task builders named in the config by ``_target_`` (:mod:`smclm.tasks.plugin`).
``log_phi_max`` is a known upper bound on log φ (0 for indicators and class probabilities), used
by rejection sampling of exact target samples; None when no bound is known. ``beta`` is the
potential's inverse temperature where it has one (PPO's reward is log φ / β).

Stopping tasks (``stop_ids`` non-empty; README "Stopping"): outputs are finished sequences
z_1:ℓ that end in a stop token, with ``min_len`` ≤ ℓ ≤ ``output_len`` = T (ℓ counts the stop),
and σ̃(z) = p₀(z_1:ℓ)·φ(z). The potential is called on finished sequences only, tokens [N, ℓ]
ending in their stop (rows of one call share ℓ); the sampler pads them to T with the first stop
id. Empty ``stop_ids``: every output has exactly T tokens, as before.

A task may carry a ``logit_bias`` b [V] (None for most): then its base distribution is
p̃₀ ∝ exp(logits + b), which the model uses everywhere p₀'s logits are made (sampling, teacher
forcing, rewards, a full/LoRA policy's logits; :func:`smclm.models.twisted_lm.output_logits`),
handed to it by :func:`smclm.build.build_world` (e.g. next_sentence's −50 on banned tokens).

Conditional tasks (``cond_len`` = c > 0, infilling) condition on c tokens o that follow the
output: their exact target samples come from joint sampling (``sample_joint``): draw T + c tokens
from p₀; the first T are an exact sample of σ(· | o) for the o formed by the last c.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError, PotentialError
from smclm.smc.sampler import Stopping


@dataclass
class Task:
    name: str
    prompt_ids: Tensor  # [P]
    output_len: int  # T
    potential: Callable[..., Tensor]
    log_phi_max: float | None = None
    cond_len: int = 0  # c > 0 for conditional tasks (infilling)
    beta: float = 1.0
    stop_ids: tuple[int, ...] = ()  # ⊤; empty: fixed length T
    min_len: int = 1  # m, the shortest finished output (the stop counted); with stop_ids only
    logit_bias: Tensor | None = None  # [V] added to p₀'s logits everywhere (None: none)
    # a tool that forces steps of p₀ (task.calculator; smclm.tasks.calculator.CalculatorTool),
    # set on the model with the logit bias (None: none)
    tool: Any = None
    # Tasks with a prompt file (next_sentence): the training and test prompts' ids ([P] each).
    # With more than one training prompt the trainer draws one per update (:meth:`for_prompt`).
    train_prompts: tuple[Tensor, ...] = ()
    test_prompts: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if self.stop_ids:
            self.stopping.check_cap(self.output_len)

    @property
    def stopping(self) -> Stopping | None:
        """The sampler's stopping rule (None for a fixed-length task)."""
        return Stopping(self.stop_ids, int(self.min_len)) if self.stop_ids else None

    def for_prompt(self, prompt_ids: Tensor) -> Task:
        """This task conditioned on another prompt: the same T, stopping, bias and prompt lists;
        a potential that depends on the prompt (it has ``for_prompt``, e.g. next_sentence's
        tempered p̃₀) is rebound to it."""
        ids = prompt_ids.to(self.prompt_ids.device)
        rebind = getattr(self.potential, "for_prompt", None)
        return replace(
            self, prompt_ids=ids, potential=self.potential if rebind is None else rebind(ids)
        )

    def log_phi_from_log_p0(self, log_p0: Tensor) -> Tensor | None:
        """log φ from log p̃₀(z | prompt) of the same sequences (any shape) when the potential is
        a power of p̃₀ alone (``potential.log_p0_exponent`` = c: log φ = c·log p̃₀, e.g.
        next_sentence's tempered target), so that callers that hold log p̃₀ (the sampler,
        modified SubTB's prefix rewards) skip the potential's own pass; None otherwise."""
        c = getattr(self.potential, "log_p0_exponent", None)
        return None if c is None else float(c) * log_p0.float()

    def log_phi(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        """log φ(s_1:T [, o]) for tokens [N, T] → [N] float32. A stopping task scores each row's
        finished sequence z_1:ℓ (up to its first stop; the whole row if it has none), calling
        the potential once per distinct ℓ."""
        if self.cond_len and cond is None:
            raise ValueError(f"task '{self.name}' conditions on o; pass cond [N, {self.cond_len}]")
        stopping = self.stopping
        if stopping is None:
            return self.checked(self.potential(tokens, cond).float())
        lengths = stopping.lengths(tokens)
        out = torch.empty(tokens.shape[0], dtype=torch.float32, device=tokens.device)
        for ell in torch.unique(lengths).tolist():
            rows = (lengths == ell).nonzero().squeeze(1)
            c = None if cond is None else cond.index_select(0, rows.to(cond.device))
            phi = self.potential(tokens.index_select(0, rows)[:, :ell], c).float()
            out[rows] = phi.to(out.device)
        return self.checked(out)

    def checked(self, log_phi: Tensor) -> Tensor:
        """``log_phi`` [N] itself, or a PotentialError when some entries are NaN or +inf.

        The potential is evaluated on full sequences, i.e. at the sampler's last step t = T;
        −inf (φ = 0) is legal. One host sync per call (once per SMC run)."""
        if bool((log_phi < float("inf")).all()):
            return log_phi
        n_nan = int(torch.isnan(log_phi).sum())
        n_inf = int(torch.isposinf(log_phi).sum())
        where = (
            f"at step t = T = {self.output_len} (where the potential is evaluated)"
            if not self.stop_ids
            else "at the step where they stopped (where the potential is evaluated)"
        )
        raise PotentialError(
            f"task '{self.name}': log φ is NaN for {n_nan} and +inf for {n_inf} of "
            f"{log_phi.shape[0]} particles {where}; log φ must be finite or -inf (φ = 0): check "
            "the potential's settings (e.g. task.beta, task.epsilon) and the model's dtype"
        )

    def bind(self, cond: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """log φ with the conditioning bound in, the form the sampler takes."""
        return BoundPotential(self, cond)

    @torch.no_grad()
    def sample_joint(
        self, model: Any, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """n exact pairs (s [n, T], o [n, c]) for a conditional task: T + c tokens from p₀."""
        from smclm.smc.sampler import no_potential, run_smc

        if not self.cond_len:
            raise ValueError(f"task '{self.name}' has no conditioning tokens to sample")
        t_len = self.output_len
        run = run_smc(
            model.with_twist(None),
            self.prompt_ids,
            t_len + self.cond_len,
            no_potential,
            n,
            ess_threshold=0.0,
            generator=generator,
        )
        return run.tokens[:, :t_len], run.tokens[:, t_len:]


class BoundPotential:
    """``tokens -> log φ(tokens, cond)``. When the potential can read the sampler's KV cache
    (``potential.from_cache``, e.g. infilling's log p₀(o | prompt, s)), the sampler calls
    :meth:`from_cache` at the last step instead of re-running the base model over the prefix."""

    def __init__(self, task: Task, cond: Tensor | None) -> None:
        self.task, self.cond = task, cond

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.task.log_phi(tokens, self.cond)

    @property
    def stopping(self) -> Stopping | None:
        """The task's stopping rule: the sampler stops where the task says."""
        return self.task.stopping

    def from_log_p0(self, log_p0: Tensor) -> Tensor | None:
        """:meth:`Task.log_phi_from_log_p0` (checked), or None."""
        out = self.task.log_phi_from_log_p0(log_p0)
        return None if out is None else self.task.checked(out)

    def select(self, rows: Tensor) -> BoundPotential:
        """The same potential for the particles ``rows`` only (their conditioning rows)."""
        cond = None if self.cond is None else self.cond.index_select(0, rows.to(self.cond.device))
        return BoundPotential(self.task, cond)

    def from_cache(self, model: Any, ctx: Any, tokens: Tensor) -> Tensor | None:
        """log φ from the base model's cache of [prompt, s_1:T−1], or None when unsupported.
        The cache is extended (it is not used after the last step). Fixed-length tasks only."""
        fn = getattr(self.task.potential, "from_cache", None)
        if fn is None or self.cond is None:
            return None
        out = fn(model, ctx, tokens, self.cond)
        return None if out is None else self.task.checked(out.float())


def resolve_stop_ids(tokenizer: Any, stop: Any, vocab_size: int) -> tuple[int, ...]:
    """``task.stop`` as token ids: None or [] (no stop: fixed length), one entry or a list of
    them; an int is a token id, a string is text that must encode (without special tokens) to
    exactly one token of this tokenizer, so one config serves every model."""
    if stop is None:
        return ()
    entries = [stop] if isinstance(stop, (str, int)) else list(stop)
    ids: list[int] = []
    for entry in entries:
        if isinstance(entry, bool):
            raise ConfigError(f"task.stop entry {entry!r} is neither a token id nor a string")
        if isinstance(entry, int):
            if not 0 <= entry < vocab_size:
                raise ConfigError(
                    f"task.stop id {entry} is outside the model's vocabulary [0, {vocab_size}); "
                    "give a token id below the vocabulary size, or the stop as a string"
                )
            ids.append(entry)
            continue
        if not isinstance(entry, str) or not entry:
            raise ConfigError(
                f"task.stop entry {entry!r} is neither a token id nor a non-empty string"
            )
        try:
            enc = list(tokenizer(entry, add_special_tokens=False)["input_ids"])
        except Exception as e:  # the toy tokenizer raises on unknown words
            raise ConfigError(f"task.stop entry {entry!r} cannot be tokenised ({e})") from e
        if len(enc) != 1:
            raise ConfigError(
                f"task.stop entry {entry!r} is {len(enc)} tokens {enc} for this tokenizer; a stop "
                "must be one token: give its token id or a string that encodes to one token"
            )
        ids.append(int(enc[0]))
    return tuple(dict.fromkeys(ids))


def choose_prompt(n: int, split: str, prompt_index: Any, what: str = "prompts") -> int | None:
    """``task.prompt_index`` of a task with train/test prompts (next_sentence, latent): the index
    into the ``n`` ``what`` of ``split``, or None for ``all`` (train on every training one, one
    drawn per update); one line for a bad value."""
    if split not in ("train", "test"):
        raise ConfigError(f"task.split={split} must be train or test")
    if str(prompt_index) == "all":
        if split != "train":
            raise ConfigError(
                f"task.prompt_index=all trains on every training one of the {what}; it needs "
                "task.split=train"
            )
        return None
    try:
        index = int(prompt_index)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < n:
        raise ConfigError(
            f"task.prompt_index={prompt_index} is outside the {n} {split} {what}; pick "
            f"0..{n - 1}, or all (training on every training one)"
        )
    return index
