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

Conditional tasks (``cond_len`` = c > 0, infilling) condition on c tokens o that follow the
output: their exact target samples come from joint sampling (``sample_joint``): draw T + c tokens
from p₀; the first T are an exact sample of σ(· | o) for the o formed by the last c.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smclm.errors import PotentialError


@dataclass
class Task:
    name: str
    prompt_ids: Tensor  # [P]
    output_len: int  # T
    potential: Callable[..., Tensor]
    log_phi_max: float | None = None
    cond_len: int = 0  # c > 0 for conditional tasks (infilling)
    beta: float = 1.0

    def log_phi(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        """log φ(s_1:T [, o]) for tokens [N, T] → [N] float32."""
        if self.cond_len and cond is None:
            raise ValueError(f"task '{self.name}' conditions on o; pass cond [N, {self.cond_len}]")
        return self.checked(self.potential(tokens, cond).float())

    def checked(self, log_phi: Tensor) -> Tensor:
        """``log_phi`` [N] itself, or a PotentialError when some entries are NaN or +inf.

        The potential is evaluated on full sequences, i.e. at the sampler's last step t = T;
        −inf (φ = 0) is legal. One host sync per call (once per SMC run)."""
        if bool((log_phi < float("inf")).all()):
            return log_phi
        n_nan = int(torch.isnan(log_phi).sum())
        n_inf = int(torch.isposinf(log_phi).sum())
        raise PotentialError(
            f"task '{self.name}': log φ is NaN for {n_nan} and +inf for {n_inf} of "
            f"{log_phi.shape[0]} particles at step t = T = {self.output_len} (where the potential "
            "is evaluated); log φ must be finite or -inf (φ = 0): check the potential's settings "
            "(e.g. task.beta, task.epsilon) and the model's dtype"
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

    def from_cache(self, model: Any, ctx: Any, tokens: Tensor) -> Tensor | None:
        """log φ from the base model's cache of [prompt, s_1:T−1], or None when unsupported.
        The cache is extended (it is not used after the last step)."""
        fn = getattr(self.task.potential, "from_cache", None)
        if fn is None or self.cond is None:
            return None
        out = fn(model, ctx, tokens, self.cond)
        return None if out is None else self.task.checked(out.float())
