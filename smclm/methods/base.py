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

Stopping tasks (``task.stopping``, README "Stopping"): every sample (SMC/SIS particles, p₀
samples, exact samples) is a finished sequence z_1:ℓ padded to T after its stop. The helpers
below are the learners' one view of that rule, all read from :class:`smclm.smc.sampler.Stopping`
(the sampler's own definition): :func:`live_positions` (the steps t ≤ ℓ a loss may use; the
stop step ℓ is where the twist's value of the stopped sequence, whose optimum is φ, is
trained, as ψ_T is for a fixed-length task), :func:`proposal_log_softmax` (the proposal as the
sampler masks it: no stop before ``min_len``, only stops at the cap) and
:func:`log_p0_allowed` (log p₀ of the tokens that proposal allows: log p₀ − log q of the masked
p₀ proposal, for learners that need p₀ expectations from its samples). Each returns the
fixed-length answer unchanged, operation for operation, when the task does not stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
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
        groups = 1 if cond is None or ess_threshold <= 0 else self.n_groups
        if pinned is not None and pinned.shape[0] != groups:
            raise ValueError(f"pinned has {pinned.shape[0]} rows for {groups} SMC runs")
        if n % groups:
            raise ValueError(f"{n} particles do not split into {groups} SMC runs (one per o)")
        # All the runs (one per o group) in one batched sampler call.
        res = run_smc(
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
            stopping=self.task.stopping,  # p₀ negatives (no_potential) stop as the task does
        )
        if self.meter is not None:  # n per step the sampler ran (fewer than T once all stopped)
            self.meter.sampled(n * (res.steps or self.task.output_len))
        return res

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


def live_positions(task: Task, tokens: Tensor, lengths: Tensor | None = None) -> Tensor | None:
    """Which steps of tokens [N, T] a loss uses: [N, T] bool, t ≤ ℓ of each row (its stop
    included; ``lengths`` [N]: the sampler's ``SMCResult.lengths``, else read from the tokens by
    ``Stopping.lengths``). None for a fixed-length task (every step counts)."""
    stopping = task.stopping
    if stopping is None:
        return None
    if lengths is None:
        lengths = stopping.lengths(tokens)
    pos = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return pos[None] <= lengths.to(tokens.device)[:, None]


def allowed_steps(task: Task, t_len: int, vocab_size: int, device: torch.device) -> Tensor | None:
    """[T, V] bool: the tokens the proposal may draw at each step t = 1..T
    (``Stopping.allowed``); None for a fixed-length task (every token, every step)."""
    stopping = task.stopping
    if stopping is None:
        return None
    steps = range(1, t_len + 1)
    return torch.stack([stopping.allowed(t, t_len, vocab_size, device) for t in steps])


def proposal_log_softmax(task: Task, logits: Tensor) -> Tensor:
    """log q_t(· | s_<t) [N, T, V] from the proposal's unnormalised per-step logits [N, T, V]
    (log p₀ + log ψ, or a policy's log q), masked as the sampler masks them for a stopping
    task; a plain log-softmax otherwise."""
    allowed = allowed_steps(task, logits.shape[-2], logits.shape[-1], logits.device)
    if allowed is None:
        return F.log_softmax(logits, dim=-1)
    return F.log_softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)


def log_p0_allowed(task: Task, log_p0_all: Tensor) -> Tensor | None:
    """log p₀(allowed_t | s_<t) [N, T] from the teacher-forced log p₀ [N, T, V]: the mass the
    masked p₀ proposal renormalises, i.e. log p₀(s_t) − log q(s_t) of every token it can draw
    (0 where every token is allowed, m ≤ t < T). None for a fixed-length task."""
    allowed = allowed_steps(task, log_p0_all.shape[-2], log_p0_all.shape[-1], log_p0_all.device)
    if allowed is None:
        return None
    return torch.logsumexp(log_p0_all.masked_fill(~allowed, -math.inf), dim=-1)


def masked_normalize(batch: TrainContext, log_w: Tensor, live: Tensor) -> Tensor:
    """:meth:`TrainContext.normalize` of log_w [K, T] over the rows live at each step
    (``live`` [K, T]); a step where no row (of a group) is live gets weight 0, not NaN."""
    w = batch.normalize(log_w.masked_fill(~live, -math.inf))
    return w.nan_to_num(nan=0.0)


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


def task_demonstrations(task: Task, who: str) -> list[tuple[Tensor, Tensor]]:
    """The task's demonstrations (task=latent: the labelled training rows' z), grouped by prompt:
    (prompt ids, finished sequences [n, T] padded after their stop); one line naming ``who``
    (the setting that asked) when the task has none, or none that fits in T."""
    seeds = getattr(task.potential, "seed_sequences", None)
    if seeds is None or task.stopping is None:
        raise ConfigError(
            f"{who}: task '{task.name}' has no demonstrations (use task=latent with rows that "
            "have z)"
        )
    groups = seeds(task.output_len, task.stopping.pad_id)
    if not groups:
        raise ConfigError(
            f"{who}: no row of task '{task.name}' has a z that fits in "
            f"task.output_len={task.output_len} tokens with its stop"
        )
    return groups
