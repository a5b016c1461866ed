"""Exact answers by enumeration, for toy problems with Vᵀ ≤ ~10⁶ sequences.

Enumerates every output sequence s ∈ [V]ᵀ (index = Σ_t s_t V^(T−t), s_1 most significant), and
computes log p₀(s), log φ(s), log Z = log Σ p₀φ, the optimal twists

    log ψ*_t(s_1:t) = log Σ_{s_t+1:T} p₀(s_t+1:T | s_1:t) φ(s)        (paper Eq. 11–12, ψ*_T = φ)

and, for any twisted LM, log q(s) of its proposal and the exact KL(q‖σ), KL(σ‖q). This is the
oracle the estimators and learners are tested against.
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


@torch.no_grad()
def enumerate_log_probs(
    model: TwistedLM,
    prompt_ids: Tensor,
    output_len: int,
    cond: Tensor | None = None,
    proposal: str = "twist",
) -> tuple[Tensor, Tensor]:
    """log p₀(s) and log q(s) (float64 [Vᵀ], lexicographic order) by growing the prefix tree.

    Level t holds all V^(t−1) prefixes in one batch with a KV cache: Σ_t V^t single-token
    forwards instead of Vᵀ·T teacher-forced positions. cond: [1, c] conditioning tokens or None.
    """
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

    @property
    def log_sigma(self) -> Tensor:
        """Normalised log σ(s) [M]."""
        return self.log_p0 + self.log_phi - self.log_z

    def psi_star_tables(self) -> list[Tensor]:
        """log ψ*_t as tables [V^(t−1), V] for t = 1..T (ψ*_T = φ)."""
        v, t_len = self.vocab_size, self.output_len
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
    seqs = all_sequences(v, t_len)
    log_p0, _ = enumerate_log_probs(model.with_twist(None), task.prompt_ids, t_len, cond)
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
    return ExactSolution(v, t_len, seqs, log_p0, log_phi, log_z)


def exact_metrics(
    model: TwistedLM,
    task: Task,
    solution: ExactSolution | None = None,
    cond: Tensor | None = None,
) -> dict[str, float]:
    """Flat metrics: log_z/exact and kl/{q_sigma,sigma_q}_exact of the twisted proposal (and p₀)."""
    sol = solution or solve(model, task, cond)
    _, log_q = enumerate_log_probs(model, task.prompt_ids, task.output_len, cond)
    kl = sol.kl(log_q)
    kl_p0 = sol.kl(sol.log_p0)
    return {
        "log_z/exact": sol.log_z,
        "kl/q_sigma_exact": kl["q_sigma"],
        "kl/sigma_q_exact": kl["sigma_q"],
        "kl/p0_q_sigma_exact": kl_p0["q_sigma"],
        "kl/p0_sigma_q_exact": kl_p0["sigma_q"],
    }
