"""What every learner gets and returns.

A method is an object with ``loss(batch: TrainContext) -> (loss, metrics)``. It draws the
samples it needs itself (SIS/SMC from the twisted proposal, p₀ samples, exact target samples from
``batch.exact_pool``) under ``torch.no_grad()``, then makes one teacher-forced pass
(``model.forward_full``) with gradients through the twist only. The trainer calls ``loss``,
steps the optimiser, and never branches on the method's name.

Conventions (paper-spec §4): w̄ = softmax(stop_grad(log w)); sums over t are means over t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import SMCResult, run_smc
from smclm.tasks.base import Task


@dataclass
class TrainContext:
    model: TwistedLM
    task: Task
    n_particles: int  # the batch: K particles / samples per update (paper's n_twist)
    generator: torch.Generator
    resampling: str = "multinomial"
    exact_pool: Tensor | None = None  # [M, T] exact σ samples, when available
    cond: Tensor | None = None  # [K, c] conditioning tokens for this update (infilling)

    def sample(self, ess_threshold: float, p0: bool = False) -> SMCResult:
        """K particles for this update: SIS (ess_threshold=0) or SMC (1.0) from the twisted
        proposal, or plain p₀ samples (p0=True). Call under torch.no_grad()."""
        model = self.model.with_twist(None) if p0 else self.model
        return run_smc(
            model,
            self.task.prompt_ids,
            self.task.output_len,
            self.task.bind(self.cond),
            self.n_particles,
            resampling=self.resampling,
            ess_threshold=ess_threshold,
            cond=self.cond,
            generator=self.generator,
        )

    def draw_exact(self, k: int) -> Tensor:
        """k exact target samples drawn uniformly (with replacement) from the pool: [k, T]."""
        if self.exact_pool is None:
            raise ValueError("this method needs exact target samples but no pool was given")
        idx = torch.randint(
            0,
            self.exact_pool.shape[0],
            (k,),
            generator=self.generator,
            device=self.generator.device,
        )
        return self.exact_pool[idx.to(self.exact_pool.device)].to(self.model.device)


class Method(Protocol):
    name: str
    needs_exact: bool

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]: ...


def check_positives(method: str, positives: str, allowed: tuple[str, ...] | list[str]) -> str:
    """Return ``positives`` or raise the one-line error that lists the valid values."""
    if positives not in allowed:
        raise ConfigError(
            f"method.positives={positives!r} is not valid for {method}; choose one of: "
            f"{', '.join(allowed)}"
        )
    return positives


def require_twist(method: str, model: TwistedLM) -> None:
    """Every learner trains a twist; refuse a model without one (twist=none)."""
    if model.twist is None:
        raise ConfigError(f"{method} trains a twist, but the model has none; set twist=mlp|linear")
