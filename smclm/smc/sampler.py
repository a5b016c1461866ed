"""Twisted SMC (paper Alg. 1, paper-spec §3) as ``init``/``step`` over an explicit state.

Targets: π̃_t = p₀(s_1:t)·ψ_t(s_1:t) for t < T and π̃_T = p₀(s_1:T)·φ(s_1:T); ψ₀ ≡ 1.
Proposal: q_t ∝ p₀·ψ_t (``proposal="twist"``, the learned ψ_T at t = T) or p₀ (``"p0"``).
Incremental weight: log α_t = log π̃_t − log π̃_{t−1} − log q_t(s_t | s_<t).
Running estimate: log Ẑ += logsumexp(log w_t) − logsumexp(log w_{t−1}); with log w = 0 after a
resample this is log mean_k α_t^k, and with no resampling (SIS) it telescopes to the IWAE
estimate logmeanexp(log p₀ + log φ − log q).

Resampling happens after the weight update of step t < T when ESS < ess_threshold·N
(ess_threshold ≥ 1: every step, as in the paper; 0: never, i.e. SIS). There is no resample after
the last step: the result is a weighted particle set (tokens, log_w) approximating σ.

Conditional SMC (``pinned`` = an exact target sample s^σ [T]): particle 0's token is forced to
s^σ_t and keeps its own lineage; the other N−1 ancestors are drawn from all N weights. Its log Ẑ
is a stochastic upper bound on log Z (paper App. F).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.models.cache import note_changed_rows
from smclm.models.twisted_lm import SamplingContext, StepDists, TwistedLM
from smclm.smc.resampling import arrange_rows, get_resampler, multinomial_unsorted


class ParticleCollapseError(RuntimeError):
    """Every particle has weight zero (log w = −∞): the target has no mass where q put particles."""

    def __init__(self, step: int, n_particles: int) -> None:
        super().__init__(
            f"all {n_particles} particles have zero weight at step {step}: log φ = -inf (or a "
            "-inf twist) on every particle. Fixes: increase smc.n_particles, use a potential "
            "with a positive floor (task.epsilon > 0), or train/check the twist."
        )
        self.step = step


@dataclass
class StepInfo:
    """What one SMC step did."""

    t: int
    ess: float  # effective sample size of the weights after this step's update
    resampled: bool
    n_unique: int  # distinct ancestors (N when not resampled)
    log_z_increment: float


@dataclass
class SMCState:
    """Particles after t steps. Shapes: tokens [N, t]; the rest [N] except next_dists."""

    t: int
    tokens: Tensor
    log_w: Tensor
    log_gamma: Tensor  # log π̃_t of each particle's history
    log_p0: Tensor  # Σ log p₀(s_i | s_<i) along each particle's history
    log_q: Tensor  # Σ log q_i(s_i | s_<i) along each particle's history
    log_z_hat: Tensor  # scalar
    ctx: SamplingContext
    next_dists: StepDists
    infos: list[StepInfo] = field(default_factory=list)


@dataclass
class SMCResult:
    """A finished run. tokens [N, T]; log_w, log_phi, log_p0, log_q [N]; log_z_hat scalar."""

    tokens: Tensor
    log_w: Tensor
    log_z_hat: float
    log_phi: Tensor
    log_p0: Tensor
    log_q: Tensor
    infos: list[StepInfo]

    @property
    def normalized_weights(self) -> Tensor:
        return torch.softmax(self.log_w, dim=0)

    @property
    def ess(self) -> float:
        return ess(self.log_w)


def ess(log_w: Tensor) -> float:
    """Effective sample size (Σw)²/Σw² computed in log space."""
    log_w = log_w.double()
    if torch.isneginf(log_w).all():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of log_probs [N, V] by inverse CDF (~5x cheaper than multinomial on CPU)."""
    cdf = torch.cumsum(torch.softmax(log_probs.float(), dim=-1), dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return idx.clamp_(max=cdf.shape[1] - 1)


def init(
    model: TwistedLM, prompt_ids: Tensor, n_particles: int, cond: Tensor | None = None
) -> SMCState:
    """Start n_particles empty continuations of the prompt [P]."""
    ctx, dists = model.start(prompt_ids, n_particles, cond)
    dev = dists.log_p0.device
    zeros = torch.zeros(n_particles, device=dev)
    empty = torch.zeros(n_particles, 0, dtype=torch.long, device=dev)
    return SMCState(
        0, empty, zeros, zeros.clone(), zeros.clone(), zeros.clone(), zeros.sum(), ctx, dists
    )


@torch.no_grad()
def step(
    model: TwistedLM,
    state: SMCState,
    output_len: int,
    log_phi: Callable[[Tensor], Tensor],
    *,
    proposal: str = "twist",
    resampling: str = "multinomial",
    ess_threshold: float = 1.0,
    pinned: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> SMCState:
    """Propose s_t, weight, maybe resample, and advance the caches. Returns the new state.

    temperature ≠ 1 draws from q^(1/τ) (renormalised) and weights by that tempered proposal, so
    the weights stay valid importance weights (GFlowNet exploration; never used for evaluation).
    """
    t = state.t + 1
    n = state.log_w.shape[0]
    lp = state.next_dists.log_p0
    lpsi = state.next_dists.log_psi
    if state.next_dists.log_q is not None and proposal != "p0":
        log_q_all = state.next_dists.log_q  # a policy's own proposal
    else:
        logits = lp if (lpsi is None or proposal == "p0") else lp + lpsi
        log_q_all = F.log_softmax(logits, dim=-1)
    if temperature != 1.0:
        log_q_all = F.log_softmax(log_q_all / temperature, dim=-1)
    s_t = sample_categorical(log_q_all, generator)
    if pinned is not None:
        s_t[0] = pinned[t - 1]
    idx = s_t[:, None]
    log_q_t = log_q_all.gather(1, idx).squeeze(1)
    log_p0 = state.log_p0 + lp.gather(1, idx).squeeze(1)
    tokens = torch.cat([state.tokens, idx], dim=1)
    if t < output_len:  # ψ_t (ψ ≡ 1 without a twist: log π̃_t = log p₀ exactly)
        log_gamma = log_p0 + lpsi.gather(1, idx).squeeze(1) if lpsi is not None else log_p0
    else:  # φ at T; a potential that can read the KV cache does (infilling: no re-run)
        cached = getattr(log_phi, "from_cache", None)
        phi = cached(model, state.ctx, tokens) if cached is not None else None
        log_gamma = log_p0 + (log_phi(tokens) if phi is None else phi).float().to(log_p0.device)
    log_alpha = log_gamma - state.log_gamma - log_q_t
    # After init or a resample every log w is 0, and 0 + log α = log α exactly.
    prev_zero = not state.infos or state.infos[-1].resampled
    log_w = log_alpha if prev_zero else state.log_w + log_alpha
    lse, inc, w_ess = _weight_stats(log_w, None if prev_zero else state.log_w)
    if not math.isfinite(lse):  # the rare path: find out which failure it is
        if torch.isnan(log_w).any():
            raise FloatingPointError(f"NaN log-weight at step {t}: check the potential and twist")
        if torch.isneginf(log_w).all():
            raise ParticleCollapseError(t, n)
    log_q = state.log_q + log_q_t
    resampled, n_unique = False, n
    if t < output_len and _should_resample(w_ess, n, ess_threshold):
        # Only the multiset of ancestors matters (it is arranged next), so multinomial
        # resampling skips the sort.
        if pinned is None:
            resample = multinomial_unsorted if resampling == "multinomial" else None
            anc = (resample or get_resampler(resampling))(log_w, n, generator)
        else:  # conditional SMC: particle 0 keeps its lineage; multinomial for the rest
            anc = torch.cat(
                [
                    torch.zeros(1, dtype=torch.long, device=log_w.device),
                    multinomial_unsorted(log_w, n - 1, generator),
                ]
            )
        # Every survivor goes to its own slot (so the pinned particle 0 stays in slot 0); the
        # rows that change are passed on to the cache reordering.
        anc, dst, src = arrange_rows(anc)
        note_changed_rows(anc, dst, src)
        tokens, log_gamma, log_p0, log_q = (
            x.index_select(0, anc) for x in (tokens, log_gamma, log_p0, log_q)
        )
        log_w = torch.zeros_like(log_w)
        model.reorder(state.ctx, anc)
        resampled, n_unique = True, n - dst.shape[0]
    info = StepInfo(t, w_ess, resampled, n_unique, inc)
    next_dists = (
        # tokens[:, -1] is s_t[anc] after a resample
        model.advance(state.ctx, tokens[:, -1].contiguous() if resampled else s_t)
        if t < output_len
        else state.next_dists
    )
    return SMCState(
        t,
        tokens,
        log_w,
        log_gamma,
        log_p0,
        log_q,
        state.log_z_hat + inc,
        state.ctx,
        next_dists,
        state.infos + [info],
    )


def _weight_stats(log_w: Tensor, prev_log_w: Tensor | None) -> tuple[float, float, float]:
    """(logsumexp log w, log Ẑ increment, ESS) of the updated weights, with one host sync.

    In float64, as ``ess``: with m = max log w and e = exp(log w − m), lse = m + log Σe and
    ESS = (Σe)²/Σe²; increment = lse − lse(previous log w), where ``prev_log_w=None`` means all
    zeros (lse = log N). A NaN, a +∞ or an all −∞ log w makes the first value non-finite.
    """
    lw = log_w.double()
    m = lw.max()
    e = torch.exp(lw - m)
    m, s1, s2 = torch.stack([m, e.sum(), e.dot(e)]).tolist()
    lse = m + math.log(s1) if s1 > 0 else math.nan
    if prev_log_w is None:
        lse_prev = math.log(log_w.shape[0])
    else:
        lse_prev = float(torch.logsumexp(prev_log_w.double(), 0))
    if not math.isfinite(lse):  # m = −∞: all −∞; m = +∞: some +∞ (else: a NaN)
        lse = m if math.isinf(m) else math.nan
        return lse, lse - lse_prev, 0.0 if lse == -math.inf else math.nan
    return lse, lse - lse_prev, s1 * s1 / s2


def _should_resample(w_ess: float, n: int, threshold: float) -> bool:
    if threshold <= 0:
        return False
    if threshold >= 1:
        return True
    return w_ess < threshold * n


def run_smc(
    model: TwistedLM,
    prompt_ids: Tensor,
    output_len: int,
    log_phi: Callable[[Tensor], Tensor],
    n_particles: int,
    *,
    proposal: str = "twist",
    resampling: str = "multinomial",
    ess_threshold: float = 1.0,
    pinned: Tensor | None = None,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> SMCResult:
    """Run T = output_len steps of twisted SMC (SIS when ess_threshold = 0).

    log_phi maps output tokens [N, T] to log φ [N] (conditioning already bound in).
    pinned: an exact target sample [T] for conditional SMC (upper bound); particle 0 carries it.
    """
    if n_particles < 1:
        raise ValueError(f"n_particles must be positive, got {n_particles}")
    if pinned is not None and n_particles < 2:
        raise ValueError("conditional SMC needs at least 2 particles")
    state = init(model, prompt_ids, n_particles, cond)
    if pinned is not None:
        pinned = pinned.to(state.log_w.device)
    for _ in range(output_len):
        state = step(
            model,
            state,
            output_len,
            log_phi,
            proposal=proposal,
            resampling=resampling,
            ess_threshold=ess_threshold,
            pinned=pinned,
            generator=generator,
            temperature=temperature,
        )
    log_phi_final = state.log_gamma - state.log_p0  # at t = T the "twist" is φ
    return SMCResult(
        state.tokens,
        state.log_w,
        float(state.log_z_hat),
        log_phi_final,
        state.log_p0,
        state.log_q,
        state.infos,
    )


def no_potential(tokens: Tensor) -> Tensor:
    """log φ ≡ 0 (p₀ samples that need no weight; an all-zero φ cannot abort such a run)."""
    return torch.zeros(tokens.shape[0], device=tokens.device)


def log_mean_exp(x: Tensor) -> float:
    """log((1/n) Σ exp x) over a 1-D tensor."""
    return float(torch.logsumexp(x.double(), 0) - math.log(x.numel()))
