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

Batched runs (``n_runs`` = G): G independent SMC runs of K particles each go through the model
as one batch of G·K rows; run g owns rows [g·K, (g+1)·K). Weights, ESS, the resampling decision
(with ESS-adaptive resampling some runs resample at a step and others do not), the ancestors
(always drawn within the run's own rows), log Ẑ and the per-step info are per run; the runs
may differ in their conditioning (``cond`` has one row per particle), their pinned sample
(``pinned`` [G, T]: slot 0 of each run; a row of −1 leaves that run unpinned), their resampling
threshold (``ess_threshold`` one per run: SIS, SMC and conditional SMC runs in one call, as the
bounds evaluator makes them) and so their potential's inputs. Every cache (base,
separate twist, policy) is reordered once per step for all runs together. A single run is the
case G = 1 (one code path): with the same generator it draws exactly what it drew before runs
were batched.

Stopping (variable-length outputs, README "Stopping"; ``stopping`` = a :class:`Stopping`, taken
from the potential when it is a task's bound potential): a task declares stop tokens ⊤, a
minimum length m and the cap T (lengths count the stop). The target is defined on finished
sequences z = z_1:ℓ (z_ℓ ∈ ⊤, no earlier stop, m ≤ ℓ ≤ T) only:

    σ̃(z) = p₀(z_1:ℓ | prompt)·φ(z),    Z = Σ_{ℓ=m..T} Σ_{z_<ℓ ∉ ⊤} p₀(z_<ℓ)·p₀(z_ℓ ∈ ⊤ | z_<ℓ)·φ(z),

with p₀ the base model's own, unmasked next-token probabilities (the stop's included, also at
ℓ = T). The proposal masks, the target does not: before step m the proposal puts no mass on ⊤,
at step T it puts mass only on ⊤ (q ∝ p₀·ψ renormalised over the allowed tokens; the forced stop
at the cap is drawn among ⊤ by p₀·ψ), and the incremental weight p₀(s_t)·γ_t/(q(s_t)·γ_{t−1})
is the ordinary importance weight of that masked proposal. At the cap it is
Σ_{v∈⊤} p₀(v)ψ(v) · φ/(ψ(s_T)·ψ_{T−1}) (with one stop token and q ∝ p₀: p₀(⊤ | z_<T)·φ/ψ_{T−1}),
i.e. the target's probability of stopping there (genlm-control's correction since its PR
#145); without it, capped sequences would be over-weighted. A particle whose token is in ⊤ is
finished: log φ is evaluated once, on its own z_1:ℓ; it is then padded with ``pad_id`` (the
first stop id), its log-weight never changes again (incremental weight 1: the absorbing state
of the Feynman–Kac model, whose intermediate targets are p₀·ψ_t on unfinished prefixes and
p₀·φ on finished sequences), and it stays in the population: it counts in the ESS, log Ẑ and
the resampling, where it can be duplicated or dropped like any particle. A run ends at the step
where every particle (of every batched run) has finished: no forward pass after that. The
result is padded to T columns and records each particle's ``lengths``. Without ⊤
(``stopping=None``) every step is the fixed-length one above, operation for operation.

Per-step cost: one host sync for the weight statistics of all runs, which also tell the
resampler that the weights are valid (it then skips its own checks: the same draws), and the
cache rows copied after a resample are only those whose ancestor changed
(``smclm.models.cache``). ``scripts/bench_smc.py`` reports the rest as ``kv_reorder_overhead``
and ``smc_overhead``. ``torch.compile`` of the bookkeeping (gathers, weight statistics, the
resampling draw) was tried on CPU and was slower than eager (about 50 µs against 44 µs per step
at N = 256), so it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.models.cache import note_changed_rows
from smclm.models.twisted_lm import SamplingContext, StepDists, TwistedLM
from smclm.smc.resampling import (
    arrange_rows,
    draw_checked_positive,
    get_resampler,
    multinomial_unsorted,
)


class ParticleCollapseError(RuntimeError):
    """Every particle has weight zero (log w = −∞): the target has no mass where q put particles."""

    def __init__(self, step: int, n_particles: int, run: int | None = None) -> None:
        where = "" if run is None else f" of run {run}"
        super().__init__(
            f"all {n_particles} particles{where} have zero weight at step {step}: log φ = -inf (or a "
            "-inf twist) on every particle. Fixes: increase smc.n_particles, use a potential "
            "with a positive floor (task.epsilon > 0), or train/check the twist."
        )
        self.step = step


@dataclass(frozen=True)
class Stopping:
    """Variable-length outputs (module docstring): the stop token ids ⊤ (non-empty) and the
    minimum length m ≥ 1 (lengths count the stop; m = 1 allows an output that is the stop
    alone). The cap T is the task's output length. Finished sequences are padded with
    ``pad_id``, the first stop id."""

    stop_ids: tuple[int, ...]
    min_len: int = 1

    def __post_init__(self) -> None:
        if not self.stop_ids:
            raise ValueError("Stopping needs at least one stop token id")
        if self.min_len < 1:
            raise ValueError(f"min_len must be at least 1 (the stop counts), got {self.min_len}")

    @property
    def pad_id(self) -> int:
        return self.stop_ids[0]

    def check_cap(self, output_len: int) -> None:
        if self.min_len > output_len:
            raise ValueError(
                f"min_len={self.min_len} is above the length cap output_len={output_len}: no "
                "output could finish; lower min_len or raise output_len"
            )

    def _ids(self, device: torch.device) -> Tensor:
        return torch.tensor(self.stop_ids, dtype=torch.long, device=device)

    def allowed(self, t: int, output_len: int, vocab_size: int, device: torch.device) -> Tensor:
        """Which tokens the proposal may draw at step t (1-based) [V] bool: no stop before m,
        only stops at the cap T, everything in between."""
        ids = self._ids(device)
        if t >= output_len:
            return torch.zeros(vocab_size, dtype=torch.bool, device=device).index_fill(0, ids, True)
        mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
        return mask.index_fill(0, ids, False) if t < self.min_len else mask

    def mask(self, logits: Tensor, t: int, output_len: int) -> Tensor:
        """logits [..., V] with the tokens not allowed at step t set to −inf (the same tensor
        when every token is allowed)."""
        if self.min_len <= t < output_len:
            return logits
        allowed = self.allowed(t, output_len, logits.shape[-1], logits.device)
        return logits.masked_fill(~allowed, -math.inf)

    def is_stop(self, tokens: Tensor) -> Tensor:
        return torch.isin(tokens, self._ids(tokens.device))

    def lengths(self, tokens: Tensor) -> Tensor:
        """ℓ of each row of tokens [N, L]: the position of its first stop (1-based), or L for a
        row without one. [N] long."""
        hit = self.is_stop(tokens)
        first = hit.long().argmax(1) + 1
        return torch.where(hit.any(1), first, torch.full_like(first, tokens.shape[1]))

    def finished(self, tokens: Tensor) -> Tensor:
        """Which rows of tokens [N, T] are finished sequences padded to T: a first stop at
        ℓ ∈ [m, T] and the pad id after it. [N] bool."""
        lengths = self.lengths(tokens)
        pos = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)[None]
        padded = ((pos <= lengths[:, None]) | (tokens == self.pad_id)).all(1)
        return self.is_stop(tokens).any(1) & (lengths >= self.min_len) & padded

    def pad(self, tokens: Tensor, width: int) -> Tensor:
        """tokens [N, L] padded with pad_id to [N, width]."""
        if tokens.shape[1] >= width:
            return tokens
        fill = tokens.new_full((tokens.shape[0], width - tokens.shape[1]), self.pad_id)
        return torch.cat([tokens, fill], dim=1)


@dataclass
class StepInfo:
    """What one SMC step did. The scalar fields summarise the G runs (G = 1: the run's own
    values); the ``*_runs`` tuples hold them per run."""

    t: int
    ess: float  # effective sample size after this step's update (mean over the runs)
    resampled: bool  # some run resampled
    n_unique: int  # distinct ancestors (K when not resampled), summed over the runs
    log_z_increment: float  # mean over the runs
    ess_runs: tuple[float, ...] = ()
    resampled_runs: tuple[bool, ...] = ()
    n_unique_runs: tuple[int, ...] = ()
    log_z_increment_runs: tuple[float, ...] = ()
    n_finished: int = 0  # particles finished after this step (stopping), summed over the runs


@dataclass
class SMCState:
    """Particles after t steps of G runs of K particles. Shapes: tokens [G·K, t]; log_w,
    log_gamma, log_p0, log_q [G·K]; log_z_hat [G] (float32); next_dists as StepDists.
    With stopping, ``finished`` [G·K] bool marks the particles that have emitted a stop (their
    log γ is then log p₀ + log φ of their own z_1:ℓ), and ``done`` is True once all have."""

    t: int
    tokens: Tensor
    log_w: Tensor
    log_gamma: Tensor  # log π̃_t of each particle's history
    log_p0: Tensor  # Σ log p₀(s_i | s_<i) along each particle's history
    log_q: Tensor  # Σ log q_i(s_i | s_<i) along each particle's history
    log_z_hat: Tensor  # [G], one per run
    ctx: SamplingContext
    next_dists: StepDists
    infos: list[StepInfo] = field(default_factory=list)
    n_runs: int = 1
    fresh: tuple[bool, ...] = (True,)  # per run: every log w is 0 (after init or a resample)
    stopping: Stopping | None = None
    finished: Tensor | None = None  # [G·K] bool (stopping only)
    done: bool = False  # stopping: every particle has finished


@dataclass
class SMCResult:
    """A finished set of G runs of K particles (G = 1: one run). tokens [G·K, T]; log_w,
    log_phi, log_p0, log_q [G·K] (run g in rows [g·K, (g+1)·K)); log_z_hats [G] float64;
    log_z_hat is their mean (G = 1: the run's log Ẑ). lengths [G·K] long: each particle's ℓ
    (with stopping: the stop's position, later columns hold the pad id; else T)."""

    tokens: Tensor
    log_w: Tensor
    log_z_hat: float
    log_phi: Tensor
    log_p0: Tensor
    log_q: Tensor
    infos: list[StepInfo]
    log_z_hats: Tensor | None = None
    n_runs: int = 1
    lengths: Tensor | None = None
    steps: int | None = None  # the steps the sampler ran: T, or fewer once every particle stopped

    @property
    def n_particles(self) -> int:
        """K, the particles of each run."""
        return self.log_w.shape[0] // self.n_runs

    def run_rows(self, g: int) -> slice:
        k = self.n_particles
        return slice(g * k, (g + 1) * k)

    @property
    def normalized_weights(self) -> Tensor:
        """Self-normalised weights within each run [G·K] (each run's sum to 1)."""
        return torch.softmax(self.log_w.view(self.n_runs, -1), dim=1).view(-1)

    @property
    def ess(self) -> float:
        """The final ESS (mean over the runs)."""
        if self.n_runs == 1:
            return ess(self.log_w)
        return sum(ess(w) for w in self.log_w.view(self.n_runs, -1)) / self.n_runs


def ess(log_w: Tensor) -> float:
    """Effective sample size (Σw)²/Σw² computed in log space."""
    log_w = log_w.double()
    if torch.isneginf(log_w).all():
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def sample_categorical(log_probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of log_probs [N, V] (normalised up to rounding, as log_softmax gives
    them) by inverse CDF (~5x cheaper than multinomial on CPU). The uniforms are scaled by each
    row's total, so the rows need not sum to 1 exactly; exp instead of softmax saves two passes
    over the vocabulary."""
    cdf = torch.cumsum(torch.exp(log_probs.float()), dim=-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return idx.clamp_(max=cdf.shape[1] - 1)


def init(
    model: TwistedLM,
    prompt_ids: Tensor,
    n_particles: int,
    cond: Tensor | None = None,
    n_runs: int = 1,
    stopping: Stopping | None = None,
) -> SMCState:
    """Start n_runs runs of n_particles empty continuations of the prompt [P] (G·K rows; cond:
    None or one row per particle [G·K, c]; stopping: variable-length outputs, or None)."""
    rows = n_runs * n_particles
    ctx, dists = model.start(prompt_ids, rows, cond)
    dev = dists.log_p0.device
    zeros = torch.zeros(rows, device=dev)
    empty = torch.zeros(rows, 0, dtype=torch.long, device=dev)
    log_z = torch.zeros(n_runs, device=dev)
    return SMCState(
        0,
        empty,
        zeros,
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        log_z,
        ctx,
        dists,
        n_runs=n_runs,
        fresh=(True,) * n_runs,
        stopping=stopping,
        finished=None if stopping is None else torch.zeros(rows, dtype=torch.bool, device=dev),
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
    ess_threshold: float | Sequence[float] = 1.0,
    pinned: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> SMCState:
    """Propose s_t, weight, maybe resample (run by run), and advance the caches. Returns the new
    state. pinned: conditional SMC, [T] (one run) or [G, T] (slot 0 of each run; a row of −1:
    that run is not pinned). ess_threshold: one for all runs, or one per run.

    temperature ≠ 1 draws from q^(1/τ) (renormalised) and weights by that tempered proposal, so
    the weights stay valid importance weights (GFlowNet exploration; never used for evaluation).

    With ``state.stopping`` the proposal is masked for step t (no stop before m, only stops at
    T), a finished particle gets the pad id with incremental weight 1, and log φ is evaluated
    on the particles that stop at this step (see the module docstring).
    """
    t = state.t + 1
    g = state.n_runs
    n = state.log_w.shape[0]
    k = n // g
    stop = state.stopping
    lp = state.next_dists.log_p0
    lpsi = state.next_dists.log_psi
    if state.next_dists.log_q is not None and proposal != "p0":
        log_q_all = state.next_dists.log_q  # a policy's own proposal
        if stop is not None and not stop.min_len <= t < output_len:
            log_q_all = F.log_softmax(stop.mask(log_q_all, t, output_len), dim=-1)
    else:
        logits = lp if (lpsi is None or proposal == "p0") else lp + lpsi
        if stop is not None:
            logits = stop.mask(logits, t, output_len)
        log_q_all = F.log_softmax(logits, dim=-1)
    if temperature != 1.0:
        log_q_all = F.log_softmax(log_q_all / temperature, dim=-1)
    s_t = sample_categorical(log_q_all, generator)
    pins = None if pinned is None else _pinned_runs(pinned, g)
    if pinned is not None:
        forced = pinned.view(g, -1)[:, t - 1]
        if pins is True:
            s_t[::k] = forced  # slot 0 of every run
        else:  # slot 0 of the pinned runs only
            s_t[::k] = torch.where(forced >= 0, forced, s_t[::k])
    finished = None
    if stop is None:
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
    else:
        s_t, tokens, log_p0, log_gamma, log_q_t, log_alpha, finished = _stopping_update(
            state, s_t, log_q_all, log_phi
        )
    # After init or a resample a run's log w are 0, and 0 + log α = log α exactly.
    all_fresh = all(state.fresh)
    log_w = log_alpha if all_fresh else state.log_w + log_alpha
    lse, inc, w_ess, positive, n_fin = _weight_stats(log_w, state.log_w, state.fresh, g, finished)
    if not all(math.isfinite(x) for x in lse):  # the rare path: find out which failure it is
        if torch.isnan(log_w).any():
            raise FloatingPointError(f"NaN log-weight at step {t}: check the potential and twist")
        dead = torch.isneginf(log_w.view(g, k)).all(1)
        if dead.any():
            raise ParticleCollapseError(t, k, int(dead.nonzero()[0]) if g > 1 else None)
    log_q = state.log_q + log_q_t
    # A run whose particles have all finished has its final weights: it does not resample.
    live = [f < k for f in n_fin] if finished is not None else [True] * g
    done = finished is not None and not any(live)
    thresholds = _per_run(ess_threshold, g)
    do = tuple(
        t < output_len and a and _should_resample(e, k, h)
        for e, a, h in zip(w_ess, live, thresholds)
    )
    n_unique = [k] * g
    resampled = any(do)
    if resampled:
        checked = all(p for p, d in zip(positive, do) if d)
        conditional = False if pins is None else pins
        anc = _ancestors(log_w.view(g, k), do, resampling, conditional, generator, checked)
        # Every survivor goes to its own slot (so the pinned particle 0 of a run stays in its
        # slot 0, and a run that does not resample keeps all its rows); the rows that change
        # are passed on to the cache reordering. The empty slots and the extra copies of a run
        # are equally many and both lie in its rows, so the arrangement never crosses runs.
        anc, dst, src = arrange_rows(anc)
        note_changed_rows(anc, dst, src)
        tokens, log_gamma, log_p0, log_q = (
            x.index_select(0, anc) for x in (tokens, log_gamma, log_p0, log_q)
        )
        if finished is not None:
            finished = finished.index_select(0, anc)
        if all(do):
            log_w = torch.zeros_like(log_w)
        else:
            rows = torch.tensor(do, device=log_w.device).repeat_interleave(k)
            log_w = log_w.masked_fill(rows, 0.0)
        if g == 1:
            n_unique = [k - dst.shape[0]]
        else:  # a run that did not resample changes no row
            n_unique = [k - c for c in torch.bincount(dst // k, minlength=g).tolist()]
        model.reorder(state.ctx, anc)
    info = StepInfo(
        t,
        w_ess[0] if g == 1 else sum(w_ess) / g,
        resampled,
        sum(n_unique),
        inc[0] if g == 1 else sum(inc) / g,
        tuple(w_ess),
        do,
        tuple(n_unique),
        tuple(inc),
        sum(n_fin),
    )
    next_dists = (
        # tokens[:, -1] is s_t[anc] after a resample
        model.advance(state.ctx, s_t.index_select(0, anc) if resampled else s_t)
        if t < output_len and not done
        else state.next_dists
    )
    # float32 like log Ẑ (the same rounding as converting the float64 values afterwards)
    inc_t = torch.tensor(inc, dtype=state.log_z_hat.dtype, device=state.log_z_hat.device)
    return SMCState(
        t,
        tokens,
        log_w,
        log_gamma,
        log_p0,
        log_q,
        state.log_z_hat + inc_t,
        state.ctx,
        next_dists,
        state.infos + [info],
        g,
        do,  # a run's log w are all 0 again exactly when it resampled
        stop,
        finished,
        done,
    )


def _stopping_update(
    state: SMCState, s_t: Tensor, log_q_all: Tensor, log_phi: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step's tokens and weights with stopping: (s_t, tokens, log p₀, log γ, log q_t,
    log α, finished), all [N] but tokens [N, t].

    A particle finished before this step gets the pad id, log q_t = 0, no p₀ term and log α = 0
    (not log γ − log γ, which is NaN where φ = 0). A particle that draws a stop token now is
    finished with log γ = log p₀(z_1:t) + log φ(z_1:t); the others carry the twist ψ_t."""
    stop = state.stopping
    assert stop is not None and state.finished is not None
    was = state.finished
    zero = torch.zeros((), device=state.log_w.device)
    s_t = s_t.masked_fill(was, stop.pad_id)
    idx = s_t[:, None]
    log_q_t = torch.where(was, zero, log_q_all.gather(1, idx).squeeze(1))
    log_p0 = state.log_p0 + torch.where(
        was, zero, state.next_dists.log_p0.gather(1, idx).squeeze(1)
    )
    tokens = torch.cat([state.tokens, idx], dim=1)
    lpsi = state.next_dists.log_psi
    log_gamma = log_p0 + lpsi.gather(1, idx).squeeze(1) if lpsi is not None else log_p0
    stopped = stop.is_stop(s_t) & ~was
    rows = stopped.nonzero().squeeze(1)
    if rows.numel():
        via_p0 = getattr(log_phi, "from_log_p0", None)  # φ a power of p̃₀: no pass of its own
        phi = None if via_p0 is None else via_p0(log_p0.index_select(0, rows))
        if phi is None:
            phi = _phi_of_rows(log_phi, tokens, rows).float().to(log_p0.device)
        log_gamma = log_gamma.index_put((rows,), log_p0.index_select(0, rows) + phi)
    log_gamma = torch.where(was, state.log_gamma, log_gamma)
    log_alpha = torch.where(was, zero, log_gamma - state.log_gamma - log_q_t)
    return s_t, tokens, log_p0, log_gamma, log_q_t, log_alpha, was | stopped


def _phi_of_rows(log_phi: Callable[[Tensor], Tensor], tokens: Tensor, rows: Tensor) -> Tensor:
    """log φ [R] of the particles ``rows`` [R] that have just stopped (tokens [N, t]: each of
    them ends in its stop). A potential with one conditioning row per particle bound in offers
    ``select(rows)`` (:class:`smclm.tasks.base.BoundPotential`); any other callable is called
    on those rows alone."""
    select = getattr(log_phi, "select", None)
    fn = select(rows) if select is not None else log_phi
    return fn(tokens.index_select(0, rows))


def _per_run(threshold: float | Sequence[float], g: int) -> tuple[float, ...]:
    """The resampling threshold of each of the g runs (one for all, or one per run)."""
    if isinstance(threshold, (int, float)):
        return (float(threshold),) * g
    out = tuple(float(h) for h in threshold)
    if len(out) != g:
        raise ValueError(f"ess_threshold has {len(out)} values for {g} runs; give one per run")
    return out


def _pinned_runs(pinned: Tensor, g: int) -> bool | Tensor:
    """True when every run is pinned, else a bool [G]: which runs are (rows of −1 are not)."""
    mask = pinned.view(g, -1)[:, 0] >= 0
    return True if bool(mask.all()) else mask


def _ancestors(
    log_w: Tensor,
    do: tuple[bool, ...],
    resampling: str,
    conditional: bool | Tensor,
    generator: torch.Generator | None,
    checked: bool = False,
) -> Tensor:
    """Global ancestor indices [G·K] for log-weights [G, K]: runs with ``do[g]`` draw theirs
    from their own weights (conditional SMC: slot 0 keeps its lineage, multinomial for the
    K − 1 others); the other runs keep every row (identity). ``conditional``: for every run, or
    a bool [G] per run (conditional and ordinary runs in one call). ``checked``: the weights of
    every resampling run are finite with positive normalised weights (``_weight_stats``), so the
    resampler may skip its checks (the same draws)."""
    g, k = log_w.shape
    if isinstance(conditional, Tensor):
        local = torch.empty(g, k, dtype=torch.long, device=log_w.device)
        for flag in (True, False):
            runs = (conditional == flag).nonzero().view(-1).to(log_w.device)
            if runs.numel():
                local[runs] = _local_ancestors(
                    log_w.index_select(0, runs), resampling, flag, generator, checked
                )
    else:
        local = _local_ancestors(log_w, resampling, conditional, generator, checked)
    if not all(do):
        keep = ~torch.tensor(do, device=log_w.device)
        local = torch.where(keep[:, None], torch.arange(k, device=log_w.device), local)
    if g == 1:
        return local.view(-1)
    return (local + k * torch.arange(g, device=log_w.device)[:, None]).view(-1)


def _local_ancestors(
    log_w: Tensor,
    resampling: str,
    conditional: bool,
    generator: torch.Generator | None,
    checked: bool,
) -> Tensor:
    """Ancestors within each run [G, K] (see :func:`_ancestors`)."""
    g, k = log_w.shape
    scheme, n_draws = ("multinomial", k - 1) if conditional else (resampling, k)
    if checked:
        local = draw_checked_positive(log_w, n_draws, scheme, generator)
    else:
        # Only the multiset of ancestors matters (it is arranged next), so multinomial
        # resampling skips the sort.
        resample = multinomial_unsorted if scheme == "multinomial" else get_resampler(scheme)
        local = resample(log_w, n_draws, generator)
    if conditional:
        local = torch.cat([torch.zeros(g, 1, dtype=torch.long, device=log_w.device), local], 1)
    return local


# A run whose smallest log w lies within this of its largest has every normalised weight
# positive (above 1e-300 / K), so resampling needs no zero-weight handling.
_POSITIVE_SPAN = 690.0


def _weight_stats(
    log_w: Tensor,
    prev_log_w: Tensor,
    fresh: tuple[bool, ...],
    g: int,
    finished: Tensor | None = None,
) -> tuple[list[float], list[float], list[float], list[bool], list[int]]:
    """Per run: (logsumexp log w, log Ẑ increment, ESS, every weight positive, particles
    finished: 0 without ``finished`` [G·K]) of the updated weights [G·K], with one host sync
    for all runs.

    In float64, as ``ess``: with m = max log w and e = exp(log w − m), lse = m + log Σe and
    ESS = (Σe)²/Σe²; increment = lse − lse(previous log w), where a ``fresh`` run's previous
    log w are all zeros (lse = log K). A NaN, a +∞ or an all −∞ log w makes the run's first
    value non-finite. "Positive": the run's log w are finite and span less than
    ``_POSITIVE_SPAN``.
    """
    lw = log_w.double().view(g, -1)
    k = lw.shape[1]
    lo, m = torch.aminmax(lw, dim=1)
    e = torch.exp(lw - m[:, None])
    parts = [m, e.sum(1), e.square().sum(1), lo]
    if not all(fresh):
        parts.append(torch.logsumexp(prev_log_w.double().view(g, -1), 1))
    if finished is not None:
        parts.append(finished.view(g, -1).sum(1).double())
    vals = torch.stack(parts).tolist()
    log_k = math.log(k)
    lses, incs, esss = [], [], []
    positive = [m_r - lo_r < _POSITIVE_SPAN for m_r, lo_r in zip(vals[0], vals[3])]
    for r in range(g):
        m_r, s1, s2 = vals[0][r], vals[1][r], vals[2][r]
        lse_prev = log_k if fresh[r] else vals[4][r]
        lse = m_r + math.log(s1) if s1 > 0 else math.nan
        if not math.isfinite(lse):  # m = −∞: all −∞; m = +∞: some +∞ (else: a NaN)
            lse = m_r if math.isinf(m_r) else math.nan
            w_ess = 0.0 if lse == -math.inf else math.nan
        else:
            w_ess = s1 * s1 / s2
        lses.append(lse)
        incs.append(lse - lse_prev)
        esss.append(w_ess)
    n_fin = [int(x) for x in vals[-1]] if finished is not None else [0] * g
    return lses, incs, esss, positive, n_fin


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
    ess_threshold: float | Sequence[float] = 1.0,
    pinned: Tensor | None = None,
    cond: Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    n_runs: int = 1,
    stopping: Stopping | None = None,
) -> SMCResult:
    """Run T = output_len steps of twisted SMC (SIS when ess_threshold = 0): n_runs independent
    runs of n_particles each, as one batch (see the module docstring).

    log_phi maps output tokens [G·K, T] to log φ [G·K] (conditioning already bound in, one row
    per particle). cond: None or [G·K, c]. pinned: exact target samples for conditional SMC
    (upper bound), [T] for one run or [G, T]; particle 0 of each run carries its row (with
    stopping: padded with the pad id after its stop); a row of −1 leaves its run unpinned (an
    ordinary run). ess_threshold: one for every run, or a sequence of one per run.

    stopping: variable-length outputs with T the cap (module docstring); None takes the
    potential's own (``log_phi.stopping``: a task's bound potential carries its task's), so a
    stopping task stops wherever its potential goes. log_phi is then called on the rows that
    stop at a step, tokens [R, t] each ending in its stop, and the run ends when all particles
    have finished.
    """
    if stopping is None:
        stopping = getattr(log_phi, "stopping", None)
    if stopping is not None:
        stopping.check_cap(output_len)
    if n_particles < 1:
        raise ValueError(f"n_particles must be positive, got {n_particles}")
    if n_runs < 1:
        raise ValueError(f"n_runs must be positive, got {n_runs}")
    if pinned is not None:
        if n_particles < 2:
            raise ValueError("conditional SMC needs at least 2 particles")
        pinned = pinned.reshape(-1, pinned.shape[-1])
        if pinned.shape != (n_runs, output_len):
            raise ValueError(
                f"pinned must be [T] or [G, T] = [{n_runs}, {output_len}], got "
                f"{tuple(pinned.shape)}"
            )
        mask = pinned[:, 0] >= 0
        if not bool(((pinned >= 0) == mask[:, None]).all()):
            raise ValueError("each pinned row is an exact sample, or all −1 for an unpinned run")
        if stopping is not None and not bool(stopping.finished(pinned[mask]).all()):
            raise ValueError(
                "pinned samples of a stopping task must be finished sequences: a stop at a "
                f"length in [{stopping.min_len}, {output_len}], the pad id {stopping.pad_id} after it"
            )
    if cond is not None and cond.shape[0] != n_runs * n_particles:
        raise ValueError(
            f"cond has {cond.shape[0]} rows for {n_runs} runs of {n_particles} particles; pass "
            "one row per particle"
        )
    _per_run(ess_threshold, n_runs)  # one threshold, or one per run
    state = init(model, prompt_ids, n_particles, cond, n_runs, stopping)
    if pinned is not None:
        pinned = pinned.to(state.log_w.device)
    for _ in range(output_len):
        if state.done:  # every particle has stopped: no more forward passes
            break
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
    log_phi_final = state.log_gamma - state.log_p0  # at t = T (or the stop) the "twist" is φ
    log_z = state.log_z_hat
    tokens = state.tokens
    steps = int(tokens.shape[1])
    if stopping is None:
        lengths = torch.full((tokens.shape[0],), output_len, device=tokens.device)
    else:
        tokens = stopping.pad(tokens, output_len)
        lengths = stopping.lengths(tokens)
    return SMCResult(
        tokens,
        state.log_w,
        float(log_z[0]) if n_runs == 1 else float(log_z.double().mean()),
        log_phi_final,
        state.log_p0,
        state.log_q,
        state.infos,
        log_z.double(),
        n_runs,
        lengths,
        steps,
    )


def no_potential(tokens: Tensor) -> Tensor:
    """log φ ≡ 0 (p₀ samples that need no weight; an all-zero φ cannot abort such a run)."""
    return torch.zeros(tokens.shape[0], device=tokens.device)


def log_mean_exp(x: Tensor) -> float:
    """log((1/n) Σ exp x) over a 1-D tensor."""
    return float(torch.logsumexp(x.double(), 0) - math.log(x.numel()))


@torch.no_grad()
def stopped_sequence_log_probs(
    model: TwistedLM,
    prompt_ids: Tensor,
    tokens: Tensor,
    stopping: Stopping,
    cond: Tensor | None = None,
    proposal: str = "twist",
) -> dict[str, Tensor]:
    """Teacher-forced per-step log p₀ and log q of finished sequences tokens [N, T] (each row
    padded after its stop), as the stopping sampler draws and weighs them: log p₀ unmasked,
    log q the proposal masked for each step (``Stopping.mask``). Both [N, T] float32, 0 after
    each row's stop; also "lengths" [N]. Summed over t they give log p₀(z) and log q(z)."""
    t_len = tokens.shape[1]
    log_p0, log_psi, log_q_policy = model.full_pass(prompt_ids, tokens, cond)
    if log_q_policy is not None and proposal != "p0":
        base = log_q_policy.detach()
    elif log_psi is None or proposal == "p0":
        base = log_p0
    else:
        base = log_p0 + log_psi.detach()
    v = base.shape[-1]
    allowed = torch.stack(
        [stopping.allowed(t, t_len, v, base.device) for t in range(1, t_len + 1)]
    )  # [T, V]
    log_q_all = F.log_softmax(base.masked_fill(~allowed, -math.inf), dim=-1)
    idx = tokens[..., None]
    lengths = stopping.lengths(tokens)
    live = torch.arange(1, t_len + 1, device=tokens.device)[None] <= lengths[:, None]
    zero = torch.zeros((), device=base.device)
    return {
        "log_p0": torch.where(live, log_p0.gather(-1, idx).squeeze(-1), zero),
        "log_q": torch.where(live, log_q_all.gather(-1, idx).squeeze(-1), zero),
        "lengths": lengths,
    }
