"""Exact answers by enumeration, for toy problems with Vᵀ ≤ ~10⁶ sequences.

Enumerates every output sequence s ∈ [V]ᵀ (index = Σ_t s_t V^(T−t), s_1 most significant), and
computes log p₀(s), log φ(s), log Z = log Σ p₀φ, the optimal twists

    log ψ*_t(s_1:t) = log Σ_{s_t+1:T} p₀(s_t+1:T | s_1:t) φ(s)        (paper Eq. 11–12, ψ*_T = φ)

and, for any twisted LM, log q(s) of its proposal and the exact KL(q‖σ), KL(σ‖q). This is the
oracle the estimators and learners are tested against.

Stopping tasks (README "Stopping"): the outputs are the finished sequences z_1:ℓ, z_ℓ ∈ ⊤, no
earlier stop, m ≤ ℓ ≤ T, each stored padded to T with the pad id (so they are the points of the
Vᵀ grid whose first stop is at ℓ ∈ [m, T] and that hold the pad id after it, in the same
lexicographic order). log p₀(z) = log p₀(z_1:ℓ) (the stop's probability included, unmasked),
log q(z) is the masked proposal's (``Stopping.mask``), Z = Σ_z p₀(z)·φ(z), and the optimal twists
are ψ*_t(z_1:t) = Σ_{finished z' ⊇ z_1:t} p₀(z')φ(z') / p₀(z_1:t): on a stop token that is φ
itself (0 before m), on any other token at t = T it is 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from smclm.errors import UserError
from smclm.models.twist import TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import Stopping
from smclm.tasks.base import Task

MAX_SEQUENCES = 1_000_000
log = logging.getLogger(__name__)


class EnumerationTooLargeError(UserError, ValueError):
    pass


def check_enumerable(vocab_size: int, output_len: int, limit: int = MAX_SEQUENCES) -> int:
    """Return Vᵀ, or raise with the fix when it is above the limit."""
    log10 = output_len * math.log10(vocab_size)
    if log10 > math.log10(limit):
        raise EnumerationTooLargeError(
            f"evaluator=exact enumerates V^T sequences, but V={vocab_size} and T={output_len} give "
            f"~1e{log10:.0f} (limit {limit:.0e}); use evaluator=bounds, or a smaller vocabulary "
            "(model=toy) or task.output_len"
        )
    return vocab_size**output_len


def all_sequences(vocab_size: int, output_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Every sequence of length T over V tokens in lexicographic order: [Vᵀ, T]."""
    grids = torch.meshgrid(*[torch.arange(vocab_size, device=device)] * output_len, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


@torch.no_grad()
def sequence_log_q(
    model: TwistedLM,
    prompt_ids: Tensor,
    seqs: Tensor,
    cond: Tensor | None = None,
    proposal: str = "twist",
    batch_size: int = 4096,
) -> tuple[Tensor, Tensor]:
    """log p₀(s) and log q(s) (float64, [M]) for sequences seqs [M, T], in batches."""
    lp, lq = [], []
    for i in range(0, seqs.shape[0], batch_size):
        chunk = seqs[i : i + batch_size].to(model.device)
        c = None if cond is None else cond.expand(chunk.shape[0], -1).to(model.device)
        out = model.sequence_log_probs(prompt_ids, chunk, c, proposal=proposal)
        lp.append(out["log_p0"].double().sum(1).cpu())
        lq.append(out["log_q"].double().sum(1).cpu())
    return torch.cat(lp), torch.cat(lq)


def finished_sequences(vocab_size: int, output_len: int, stopping: Stopping) -> Tensor:
    """Every finished sequence of a stopping task, padded to T: [M, T] in lexicographic order
    (the Vᵀ grid points whose first stop is at ℓ ∈ [m, T] with the pad id after it)."""
    grid = all_sequences(vocab_size, output_len)
    return grid[stopping.finished(grid)]


def _grid_index(seqs: Tensor, vocab_size: int) -> Tensor:
    """The lexicographic index Σ_t s_t V^(T−t) of each row of seqs [M, T]."""
    t_len = seqs.shape[1]
    powers = vocab_size ** torch.arange(t_len - 1, -1, -1, dtype=torch.long)
    return (seqs.long().cpu() * powers).sum(1)


@torch.no_grad()
def prefix_log_probs(
    model: TwistedLM,
    prompt_ids: Tensor,
    output_len: int,
    stopping: Stopping,
    cond: Tensor | None = None,
    proposal: str = "twist",
) -> tuple[list[Tensor], list[Tensor]]:
    """log p₀(s_1:t) and log q(s_1:t) of every prefix, per level t = 1..T (float64 [V^t] each,
    lexicographic), with the stopping task's masked proposal q (log p₀ unmasked). Grown as the
    prefix tree of :func:`enumerate_log_probs` (prefixes that already hold a stop are expanded
    too: the levels stay plain Vᵗ grids)."""
    v = model.vocab_size
    ctx, dists = model.start(prompt_ids, 1, cond)
    log_p0 = torch.zeros(1, dtype=torch.float64, device=model.device)
    log_q = log_p0.clone()
    levels_p0, levels_q = [], []
    for t in range(1, output_len + 1):
        rows = log_p0.shape[0]
        if dists.log_q is not None and proposal == "twist":
            logits = dists.log_q
        elif dists.log_psi is not None and proposal == "twist":
            logits = dists.log_p0 + dists.log_psi
        else:
            logits = dists.log_p0
        step_q = torch.log_softmax(stopping.mask(logits, t, output_len), dim=-1)
        log_p0 = (log_p0[:, None] + dists.log_p0.double()).reshape(-1)
        log_q = (log_q[:, None] + step_q.double()).reshape(-1)
        levels_p0.append(log_p0.cpu())
        levels_q.append(log_q.cpu())
        if t < output_len:
            dev = log_p0.device
            model.reorder(ctx, torch.arange(rows, device=dev).repeat_interleave(v))
            dists = model.advance(ctx, torch.arange(v, device=dev).repeat(rows))
    return levels_p0, levels_q


def _at_lengths(levels: list[Tensor], seqs: Tensor, stopping: Stopping, v: int) -> Tensor:
    """levels[ℓ−1] at each finished sequence's prefix z_1:ℓ: [M] float64."""
    t_len = seqs.shape[1]
    lengths = stopping.lengths(seqs.cpu())
    grid = _grid_index(seqs, v)
    out = torch.empty(seqs.shape[0], dtype=torch.float64)
    for ell in torch.unique(lengths).tolist():
        rows = lengths == ell
        out[rows] = levels[ell - 1][grid[rows] // v ** (t_len - ell)]
    return out


@torch.no_grad()
def enumerate_log_probs(
    model: TwistedLM,
    prompt_ids: Tensor,
    output_len: int,
    cond: Tensor | None = None,
    proposal: str = "twist",
    stopping: Stopping | None = None,
) -> tuple[Tensor, Tensor]:
    """log p₀(s) and log q(s) (float64 [Vᵀ], lexicographic order) by growing the prefix tree.

    Level t holds all V^(t−1) prefixes in one batch with a KV cache: Σ_t V^t single-token
    forwards instead of Vᵀ·T teacher-forced positions. cond: [1, c] conditioning tokens or None.
    stopping: a stopping task's rule; then the values are over its finished sequences
    (:func:`finished_sequences`, [M]) instead of the Vᵀ grid.
    """
    if stopping is not None:
        levels_p0, levels_q = prefix_log_probs(
            model, prompt_ids, output_len, stopping, cond, proposal
        )
        seqs = finished_sequences(model.vocab_size, output_len, stopping)
        v = model.vocab_size
        return (
            _at_lengths(levels_p0, seqs, stopping, v),
            _at_lengths(levels_q, seqs, stopping, v),
        )
    v = model.vocab_size
    ctx, dists = model.start(prompt_ids, 1, cond)
    log_p0 = torch.zeros(1, dtype=torch.float64, device=model.device)
    log_q = log_p0.clone()
    for t in range(1, output_len + 1):
        rows = log_p0.shape[0]
        step_q = dists.log_p0
        if dists.log_q is not None and proposal == "twist":
            step_q = dists.log_q
        elif dists.log_psi is not None and proposal == "twist":
            step_q = torch.log_softmax(dists.log_p0 + dists.log_psi, dim=-1)
        log_p0 = (log_p0[:, None] + dists.log_p0.double()).reshape(-1)
        log_q = (log_q[:, None] + step_q.double()).reshape(-1)
        if t < output_len:
            dev = log_p0.device
            model.reorder(ctx, torch.arange(rows, device=dev).repeat_interleave(v))
            dists = model.advance(ctx, torch.arange(v, device=dev).repeat(rows))
    return log_p0.cpu(), log_q.cpu()


@dataclass
class ExactSolution:
    """Everything enumeration gives. All tensors float64 over the Vᵀ sequences unless noted."""

    vocab_size: int
    output_len: int
    sequences: Tensor  # [M, T] long
    log_p0: Tensor  # [M]
    log_phi: Tensor  # [M]
    log_z: float
    stopping: Stopping | None = None  # a stopping task's rule: sequences are its finished ones
    prefix_log_p0: list[Tensor] | None = None  # stopping: log p₀ of every prefix, per level

    @property
    def lengths(self) -> Tensor:
        """ℓ of each sequence [M] (T for a fixed-length task)."""
        if self.stopping is None:
            return torch.full((self.sequences.shape[0],), self.output_len, dtype=torch.long)
        return self.stopping.lengths(self.sequences)

    @property
    def log_sigma(self) -> Tensor:
        """Normalised log σ(s) [M]."""
        return self.log_p0 + self.log_phi - self.log_z

    def psi_star_tables(self) -> list[Tensor]:
        """log ψ*_t as tables [V^(t−1), V] for t = 1..T (ψ*_T = φ)."""
        v, t_len = self.vocab_size, self.output_len
        if self.stopping is not None:
            return self._stopping_psi_star_tables()
        log_joint = (self.log_p0 + self.log_phi).view(*[v] * t_len)
        tables = []
        for t in range(1, t_len + 1):
            marg = log_joint
            if t < t_len:
                marg = torch.logsumexp(log_joint.reshape(v**t, -1), dim=1)
            log_p0_prefix = self._prefix_log_p0(t)
            table = (marg.reshape(-1) - log_p0_prefix).nan_to_num(nan=-math.inf)
            tables.append(table.view(v ** (t - 1), v).float())
        return tables

    def _stopping_psi_star_tables(self) -> list[Tensor]:
        """log ψ*_t(z_1:t) = log Σ_{finished z ⊇ z_1:t} p₀(z)φ(z) − log p₀(z_1:t), as tables
        [V^(t−1), V]; −inf where no finished sequence extends the prefix (a stop before m, a
        non-stop token at T, and the unreachable prefixes that already hold a stop)."""
        assert self.prefix_log_p0 is not None
        v, t_len = self.vocab_size, self.output_len
        log_joint = self.log_p0 + self.log_phi
        lengths = self.lengths
        grid = _grid_index(self.sequences, v)
        tables = []
        for t in range(1, t_len + 1):
            rows = lengths >= t
            idx = grid[rows] // v ** (t_len - t)
            x = log_joint[rows]
            top = torch.full((v**t,), -math.inf, dtype=torch.float64)
            top = top.scatter_reduce(0, idx, x, "amax")
            shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            mass = torch.zeros(v**t, dtype=torch.float64).index_add_(
                0, idx, torch.exp(x - shift[idx])
            )
            marg = torch.log(mass) + shift
            table = (marg - self.prefix_log_p0[t - 1]).nan_to_num(nan=-math.inf)
            tables.append(table.view(v ** (t - 1), v).float())
        return tables

    def _prefix_log_p0(self, t: int) -> Tensor:
        """log p₀(s_1:t) for every prefix, recovered as a log-sum over the (normalised) suffix."""
        v = self.vocab_size
        return torch.logsumexp(self.log_p0.view(v**t, -1), dim=1)

    def optimal_twist(self) -> TabularTwist:
        return TabularTwist(self.psi_star_tables())

    def kl(self, log_q: Tensor) -> dict[str, float]:
        """Exact KL(q‖σ) and KL(σ‖q) for a proposal with log q(s) [M]."""
        log_sigma = self.log_sigma
        q, sigma = log_q.exp(), log_sigma.exp()
        kl_q_sigma = torch.where(q > 0, q * (log_q - log_sigma), torch.zeros_like(q)).sum()
        kl_sigma_q = torch.where(sigma > 0, sigma * (log_sigma - log_q), torch.zeros_like(q)).sum()
        return {"q_sigma": float(kl_q_sigma), "sigma_q": float(kl_sigma_q)}


def solve(
    model: TwistedLM, task: Task, cond: Tensor | None = None, limit: int = MAX_SEQUENCES
) -> ExactSolution:
    """Enumerate the task's output space under the base model p₀."""
    v, t_len = model.vocab_size, task.output_len
    check_enumerable(v, t_len, limit)
    stopping = task.stopping
    levels = None
    if stopping is None:
        seqs = all_sequences(v, t_len)
        log_p0, _ = enumerate_log_probs(model.with_twist(None), task.prompt_ids, t_len, cond)
    else:
        seqs = finished_sequences(v, t_len, stopping)
        levels, _ = prefix_log_probs(
            model.with_twist(None), task.prompt_ids, t_len, stopping, cond, proposal="p0"
        )
        log_p0 = _at_lengths(levels, seqs, stopping, v)
    log_phi = torch.cat(
        [
            task.log_phi(seqs[i : i + 65536].to(model.device), cond).double().cpu()
            for i in range(0, seqs.shape[0], 65536)
        ]
    )
    log_z = float(torch.logsumexp(log_p0 + log_phi, 0))
    span = float(log_phi.max() - log_phi.min())
    if math.isfinite(span) and span <= 1e-9 * max(1.0, float(log_phi.abs().max())):
        log.warning(
            "log φ = %.6g for every output%s: the target σ is p₀ itself, so the KLs measure "
            "nothing of the learner; check the potential's settings (task.threshold, "
            "task.classifier, …)",
            float(log_phi[0]),
            "" if cond is None else " given this o",
        )
    return ExactSolution(v, t_len, seqs, log_p0, log_phi, log_z, stopping, levels)


def exact_metrics(
    model: TwistedLM,
    task: Task,
    solution: ExactSolution | None = None,
    cond: Tensor | None = None,
) -> dict[str, float]:
    """Flat metrics: log_z/exact and kl/{q_sigma,sigma_q}_exact of the twisted proposal (and p₀)."""
    sol = solution or solve(model, task, cond)
    _, log_q = enumerate_log_probs(
        model, task.prompt_ids, task.output_len, cond, stopping=task.stopping
    )
    kl = sol.kl(log_q)
    if task.stopping is None:
        kl_p0 = sol.kl(sol.log_p0)
    else:  # p₀ as a proposal of finished sequences is masked too (it sums to 1 over them)
        _, log_q_p0 = enumerate_log_probs(
            model, task.prompt_ids, task.output_len, cond, "p0", task.stopping
        )
        kl_p0 = sol.kl(log_q_p0)
    return {
        "log_z/exact": sol.log_z,
        "kl/q_sigma_exact": kl["q_sigma"],
        "kl/sigma_q_exact": kl["sigma_q"],
        "kl/p0_q_sigma_exact": kl_p0["q_sigma"],
        "kl/p0_sigma_q_exact": kl_p0["sigma_q"],
    }
