"""What every learner gets and returns.

A twist learner is an object with ``loss(batch: TrainContext) -> (loss, metrics)``. It draws the
samples it needs itself (SIS/SMC from the twisted proposal, p₀ samples, exact target samples from
``batch.exact_pool``) under ``torch.no_grad()``, then makes one teacher-forced pass
(``model.forward_full``) with gradients through the twist only. The trainer calls ``loss``,
steps the optimiser, and never branches on the method's name.

Conventions (paper-spec §4): w̄ = softmax(stop_grad(log w)); sums over t are means over t.

Conditional tasks (infilling): ``cond`` holds one o per row, in groups of ``group_size``
consecutive rows sharing an o; ``exact_pool`` then holds the exact s paired with each row's o
(joint sampling), and self-normalised weights are normalised within each group
(:meth:`TrainContext.normalize`), then averaged over the groups.

A method that trains a *policy* (PPO, GFlowNet) owns its update instead (:class:`PolicyMethod`):
the trainer calls ``setup`` once, then ``update(batch) -> metrics`` per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from smclm.errors import ConfigError
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import SMCResult, ess, no_potential, run_smc
from smclm.tasks.base import Task


@dataclass
class TrainContext:
    model: TwistedLM
    task: Task
    n_particles: int  # the batch: K particles / samples per update (paper's n_twist)
    generator: torch.Generator
    resampling: str = "multinomial"
    exact_pool: Tensor | None = None  # [M, T] exact σ samples (conditional: [K, T], row-paired)
    cond: Tensor | None = None  # [K, c] conditioning tokens for this update (infilling)
    group_size: int | None = None  # rows per o (conditional tasks); None: one group
    meter: Any = None  # a smclm.compute.ComputeMeter, when the trainer counts compute

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size is None else self.n_particles // self.group_size

    def normalize(self, log_w: Tensor) -> Tensor:
        """Self-normalised weights w̄ over the rows of log_w [K, ...]: softmax within each group
        of rows sharing an o, divided by the number of groups (they sum to 1 over the rows and
        average over the o's)."""
        g = self.n_groups
        if g == 1:
            return torch.softmax(log_w, dim=0)
        grouped = log_w.reshape(g, -1, *log_w.shape[1:])
        return (torch.softmax(grouped, dim=1) / g).reshape(log_w.shape)

    def sample(
        self,
        ess_threshold: float,
        p0: bool = False,
        n: int | None = None,
        temperature: float = 1.0,
        cond: Tensor | None = None,
        potential: bool = True,
        pinned: Tensor | None = None,
    ) -> SMCResult:
        """K (or n) particles for this update: SIS (ess_threshold=0) or SMC (1.0) from the
        proposal (the policy's, else the twisted one), or plain p₀ samples (p0=True). With
        conditioning and resampling, each group of rows sharing an o is its own SMC run (all
        of them in one batched sampler call; result.log_z_hat is their mean).
        potential=False skips log φ (result.log_phi is 0: for p₀ negatives that need no weight).
        pinned [G, T]: conditional SMC, one exact sample pinned in slot 0 of each group's run.
        Call under torch.no_grad()."""
        model = self.model.with_twist(None) if p0 else self.model
        n = self.n_particles if n is None else n
        cond = self.cond if cond is None else cond
        if self.meter is not None:
            self.meter.sampled(n * self.task.output_len)
        groups = 1 if cond is None or ess_threshold <= 0 else self.n_groups
        if pinned is not None and pinned.shape[0] != groups:
            raise ValueError(f"pinned has {pinned.shape[0]} rows for {groups} SMC runs")
        if n % groups:
            raise ValueError(f"{n} particles do not split into {groups} SMC runs (one per o)")
        # All the runs (one per o group) in one batched sampler call.
        return run_smc(
            model,
            self.task.prompt_ids,
            self.task.output_len,
            self.task.bind(cond) if potential else no_potential,
            n // groups,
            resampling=self.resampling,
            ess_threshold=ess_threshold,
            cond=cond,
            generator=self.generator,
            temperature=temperature,
            pinned=pinned,
            n_runs=groups,
        )

    def weighted_positives(
        self, exact: bool, ess_threshold: float
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Positive samples with self-normalised weights: K exact target samples with uniform
        weights, or a SIS (ess_threshold=0) / SMC (1) run with its normalised final weights.
        Returns (tokens [K, T], w̄ [K], metrics train/ess_frac and, sampled, train/log_z_hat).
        Call under torch.no_grad()."""
        k = self.n_particles
        if exact:
            tokens = self.draw_exact(k)
            return tokens, torch.full((k,), 1.0 / k, device=tokens.device), {"train/ess_frac": 1.0}
        run = self.sample(ess_threshold=ess_threshold)
        metrics = {"train/ess_frac": ess(run.log_w) / k, "train/log_z_hat": run.log_z_hat}
        return run.tokens, self.normalize(run.log_w), metrics

    def draw_exact(self, k: int) -> Tensor:
        """k exact target samples drawn uniformly (with replacement) from the pool: [k, T].

        Conditional tasks: the exact s paired with each row's o (k must equal K)."""
        if self.exact_pool is None:
            raise ValueError("this method needs exact target samples but no pool was given")
        if self.cond is not None:
            if k != self.exact_pool.shape[0]:
                raise ValueError(f"conditional tasks pair one exact sample per row; asked for {k}")
            return self.exact_pool.to(self.model.device)
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


class PolicyMethod(Protocol):
    """A learner that trains ``model.policy`` and owns its optimiser and update (PPO, GFlowNet)."""

    name: str
    needs_exact: bool

    def setup(self, batch: TrainContext, lr: float) -> None:
        """Build optimisers and the method's own modules (value head, log Z, flow head)."""

    def update(self, batch: TrainContext) -> dict[str, float]:
        """One update (sampling, losses, optimiser steps); returns its metrics."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """The method's own networks, for compute accounting (e.g. {"value": head})."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides model.policy (optimisers, log Z, buffers)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
