"""Tests for smclm.smc.resampling."""

from __future__ import annotations

import math

import pytest
import torch

from smclm.smc.resampling import (
    RESAMPLERS,
    arrange_in_place,
    arrange_rows,
    draw_checked_positive,
    get_resampler,
    multinomial,
    multinomial_unsorted,
    stratified,
    systematic,
)

NEG_INF = float("-inf")
SCHEMES = list(RESAMPLERS)

# Fixed weight vector: one zero weight (-inf log-weight), one tiny weight, the rest ordinary.
WEIGHTS = torch.tensor([0.30, 0.0, 3e-3, 0.18, 0.25, 0.117, 0.10, 0.05], dtype=torch.float64)
WEIGHTS = WEIGHTS / WEIGHTS.sum()
LOG_W = torch.log(WEIGHTS) + 3.7  # arbitrary offset: weights are unnormalised
ZERO_IDX = 1


def _counts(ancestors: torch.Tensor, n_particles: int) -> torch.Tensor:
    return torch.bincount(ancestors, minlength=n_particles)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [8, 7])  # N and N - 1 (conditional SMC)
def test_unbiased_counts(scheme: str, n: int) -> None:
    resample = get_resampler(scheme)
    n_particles = LOG_W.shape[0]
    reps = 3000
    gen = _gen(1234)
    counts = torch.stack([_counts(resample(LOG_W, n, gen), n_particles) for _ in range(reps)]).to(
        torch.float64
    )
    assert counts[:, ZERO_IDX].sum() == 0, "zero-weight particle was selected"
    mean = counts.mean(0)
    expected = n * WEIGHTS
    # Standard error of the mean count from the sample std over repetitions; accept
    # deviations of up to k = 4 standard errors (tiny slack for zero-variance counts).
    std_err = counts.std(0, unbiased=True) / math.sqrt(reps)
    k = 4.0
    assert torch.all((mean - expected).abs() <= k * std_err + 1e-9), (mean, expected, std_err)
    # Every positive-weight particle with a non-negligible expected count shows up.
    assert torch.all(counts.sum(0)[WEIGHTS > 1e-3] > 0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [0, 1, 5, 8, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_signature_shape_dtype(scheme: str, n: int, dtype: torch.dtype) -> None:
    resample = RESAMPLERS[scheme]
    log_w = LOG_W.to(dtype)
    out = resample(log_w, n, _gen(0))
    assert out.dtype == torch.long
    assert out.shape == (n,)
    assert out.device == log_w.device
    if n:
        assert int(out.min()) >= 0 and int(out.max()) < log_w.shape[0]
        assert not bool((out == ZERO_IDX).any())
        assert torch.equal(out, torch.sort(out).values), "ancestors should be sorted"
    # Positional call without a generator works as well.
    assert resample(log_w, n, None).shape == (n,)


def test_systematic_floor_ceil_bounds() -> None:
    gen = _gen(7)
    for trial in range(300):
        n_particles = int(torch.randint(1, 40, (1,), generator=gen))
        n = int(torch.randint(1, 60, (1,), generator=gen))
        log_w = 3.0 * torch.randn(n_particles, generator=gen, dtype=torch.float64)
        log_w[torch.rand(n_particles, generator=gen) < 0.2] = NEG_INF
        if torch.isinf(log_w).all():
            log_w[0] = 0.0
        w = torch.softmax(log_w, 0)
        counts = _counts(systematic(log_w, n, gen), n_particles)
        nw = n * w
        lo = torch.floor(nw - 1e-9)
        hi = torch.ceil(nw + 1e-9)
        assert counts.sum() == n
        assert torch.all((counts >= lo) & (counts <= hi)), (trial, counts, nw)
        assert torch.all(counts[w == 0] == 0)


def test_stratified_bounds() -> None:
    # A particle whose CDF interval has length L (in strata) gets between floor(L) - 1 and
    # ceil(L) + 1 draws: each fully covered stratum gives exactly one, the two partial ones
    # at most one each.
    gen = _gen(8)
    for trial in range(300):
        n_particles = int(torch.randint(1, 40, (1,), generator=gen))
        n = int(torch.randint(1, 60, (1,), generator=gen))
        log_w = 3.0 * torch.randn(n_particles, generator=gen, dtype=torch.float64)
        log_w[torch.rand(n_particles, generator=gen) < 0.2] = NEG_INF
        if torch.isinf(log_w).all():
            log_w[-1] = 0.0
        w = torch.softmax(log_w, 0)
        counts = _counts(stratified(log_w, n, gen), n_particles)
        nw = n * w
        lo = torch.clamp(torch.floor(nw - 1e-9) - 1, min=0)
        hi = torch.ceil(nw + 1e-9) + 1
        assert counts.sum() == n
        assert torch.all((counts >= lo) & (counts <= hi)), (trial, counts, nw)
        assert torch.all(counts[w == 0] == 0)


@pytest.mark.parametrize("n_particles", [1, 2, 7, 64, 1000])
def test_systematic_equal_weights_each_once(n_particles: int) -> None:
    gen = _gen(3)
    for _ in range(20):
        out = systematic(torch.full((n_particles,), -2.5), n_particles, gen)
        assert torch.equal(out, torch.arange(n_particles))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_weights_at_edges_never_selected(scheme: str) -> None:
    # Zero weights at the start, in the middle and at the very end of the CDF, with many
    # draws so that points come very close to 0 and to 1.
    log_w = torch.tensor([NEG_INF, NEG_INF, -1.0, NEG_INF, 0.0, -40.0, NEG_INF, NEG_INF])
    gen = _gen(11)
    for n in [1, 3, 50, 100_000]:
        out = RESAMPLERS[scheme](log_w, n, gen)
        assert torch.isfinite(log_w[out]).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_positive_weight(scheme: str) -> None:
    log_w = torch.full((6,), NEG_INF)
    log_w[4] = -1e4
    out = RESAMPLERS[scheme](log_w, 9, _gen(0))
    assert torch.equal(out, torch.full((9,), 4))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_invalid_log_weights_raise(scheme: str) -> None:
    resample = RESAMPLERS[scheme]
    with pytest.raises(ValueError, match="-inf"):
        resample(torch.full((5,), NEG_INF), 5, _gen(0))
    with pytest.raises(ValueError, match="NaN"):
        resample(torch.tensor([0.0, float("nan"), 1.0]), 3, _gen(0))
    with pytest.raises(ValueError):
        resample(torch.tensor([0.0, float("inf")]), 2, _gen(0))
    with pytest.raises(ValueError):
        resample(torch.zeros(3), -1, _gen(0))


def test_unknown_scheme_lists_names() -> None:
    with pytest.raises(ValueError) as info:
        get_resampler("residual")
    msg = str(info.value)
    assert "'residual'" in msg
    for name in ("multinomial", "systematic", "stratified"):
        assert name in msg
    assert msg == (
        "unknown resampling scheme 'residual'; choose one of: multinomial, systematic, stratified"
    )


def test_get_resampler_known_names() -> None:
    assert get_resampler("multinomial") is multinomial
    assert get_resampler("systematic") is systematic
    assert get_resampler("stratified") is stratified


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reproducible_with_seed(scheme: str) -> None:
    resample = RESAMPLERS[scheme]
    log_w = torch.randn(50, generator=_gen(5))
    torch.manual_seed(0)
    a = [resample(log_w, 50, g) for g in [_gen(42)] * 3]
    torch.manual_seed(1)  # the global RNG must not matter when a generator is given
    b = [resample(log_w, 50, g) for g in [_gen(42)] * 3]
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # Different seeds give different draws (with overwhelming probability for these sizes).
    outs = {tuple(resample(log_w, 50, _gen(s)).tolist()) for s in range(10)}
    assert len(outs) > 1


def _check_arrangement(ancestors: torch.Tensor, out: torch.Tensor) -> None:
    n_particles = ancestors.shape[0]
    assert out.dtype == torch.long
    assert out.shape == (n_particles,)
    assert torch.equal(torch.sort(out).values, torch.sort(ancestors.to(torch.long)).values)
    out_list = out.tolist()
    for i in set(ancestors.tolist()):
        assert out_list[i] == i


def test_arrange_in_place_examples() -> None:
    anc = torch.tensor([0, 0, 3, 3, 3])
    out = arrange_in_place(anc, 5)
    _check_arrangement(anc, out)
    assert out.tolist() == [0, 0, 3, 3, 3]

    anc = torch.tensor([4, 4, 4, 4, 4])
    out = arrange_in_place(anc, 5)
    _check_arrangement(anc, out)
    assert int(out[4]) == 4

    ident = torch.arange(6)
    assert torch.equal(arrange_in_place(ident, 6), ident)
    # Order of the input does not matter for a multiset; output is deterministic.
    perm = torch.tensor([5, 2, 1, 0, 3, 4])
    assert torch.equal(arrange_in_place(perm, 6), ident)
    anc = torch.tensor([2, 1, 1, 2])
    assert torch.equal(arrange_in_place(anc, 4), arrange_in_place(torch.sort(anc).values, 4))


def test_arrange_in_place_random_property() -> None:
    for seed in range(300):
        gen = _gen(seed)
        n_particles = int(torch.randint(1, 80, (1,), generator=gen))
        if seed % 2:
            anc = torch.randint(0, n_particles, (n_particles,), generator=gen)
        else:
            log_w = 2.0 * torch.randn(n_particles, generator=gen)
            scheme = SCHEMES[seed % len(SCHEMES)]
            anc = RESAMPLERS[scheme](log_w, n_particles, gen)
        out = arrange_in_place(anc, n_particles)
        _check_arrangement(anc, out)
        assert torch.equal(arrange_in_place(anc, n_particles), out)  # deterministic


def test_arrange_rows_matches_arrange_in_place_and_lists_the_changed_rows() -> None:
    for seed in range(200):
        gen = _gen(seed)
        n_particles = int(torch.randint(1, 80, (1,), generator=gen))
        anc = torch.randint(0, n_particles, (n_particles,), generator=gen)  # any order
        out, dst, src = arrange_rows(anc)
        assert torch.equal(out, arrange_in_place(anc, n_particles))
        changed = torch.nonzero(out != torch.arange(n_particles)).squeeze(1)
        assert torch.equal(dst, changed)  # ascending
        assert torch.equal(src, out[dst])
        assert not set(dst.tolist()) & set(src.tolist())  # sources keep their own slot
        assert n_particles - dst.numel() == torch.unique(anc).numel()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_multinomial_unsorted_draws_the_same_multiset(n: int) -> None:
    for seed in range(20):
        log_w = 2.0 * torch.randn(8, generator=_gen(100 + seed))
        log_w[3] = NEG_INF
        sorted_draw = multinomial(log_w, n, _gen(seed))
        unsorted = multinomial_unsorted(log_w, n, _gen(seed))
        assert torch.equal(torch.sort(unsorted).values, sorted_draw)
        assert not bool((unsorted == 3).any())
    with pytest.raises(ValueError, match="-inf"):
        multinomial_unsorted(torch.full((4,), NEG_INF), 4, _gen(0))


def test_arrange_in_place_large() -> None:
    n_particles = 4096
    anc = systematic(torch.randn(n_particles, generator=_gen(0)) * 2, n_particles, _gen(1))
    out = arrange_in_place(anc, n_particles)
    _check_arrangement(anc, out)


def test_arrange_in_place_validation() -> None:
    with pytest.raises(ValueError):
        arrange_in_place(torch.tensor([0, 1, 2]), 4)
    with pytest.raises(ValueError):
        arrange_in_place(torch.tensor([0, 4, 1, 1]), 4)
    with pytest.raises(ValueError):
        arrange_in_place(torch.tensor([0, -1, 1, 1]), 4)
    with pytest.raises(TypeError):
        arrange_in_place(torch.tensor([0.0, 1.0]), 2)


def test_cdf_zero_weight_intervals_are_exactly_empty() -> None:
    from smclm.smc.resampling import _normalised_cdf

    gen = _gen(21)
    for _ in range(50):
        n_particles = int(torch.randint(2, 300, (1,), generator=gen))
        log_w = 5.0 * torch.randn(n_particles, generator=gen)
        zero = torch.rand(n_particles, generator=gen) < 0.4
        zero[-1] = True  # trailing zero weight
        zero[0] = False
        log_w[zero] = NEG_INF
        log_w[0] = 0.0  # at least one positive weight
        cdf, last = _normalised_cdf(log_w)
        prev = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf[:-1]])
        assert torch.all(cdf[zero] == prev[zero])
        assert torch.all(cdf[1:] >= cdf[:-1])
        assert int(last) == int(torch.nonzero(~zero).max())
        assert torch.all(cdf[int(last) :] == 1.0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [64, 63])
def test_draw_checked_positive_equals_the_checked_resampler(scheme: str, n: int) -> None:
    """The sampler's fast path (weights it has already checked finite and positive) draws the
    same ancestors as the resampler itself, bit for bit, for 1-D and [G, N] weights, with
    spreads up to 600 nats (the smallest weights near 1e-261 of the largest)."""
    checked = multinomial_unsorted if scheme == "multinomial" else get_resampler(scheme)
    for seed, spread in enumerate([0.1, 1.0, 5.0, 40.0, 600.0]):
        gen = _gen(100 + seed)
        log_w = torch.rand(5, 64, generator=gen) * spread - spread / 2
        log_w[:, 0], log_w[:, 1] = spread / 2, -spread / 2  # the full spread in every row
        for w in (log_w, log_w[2], log_w.float()):
            ref = checked(w, n, _gen(seed))
            got = draw_checked_positive(w, n, scheme, _gen(seed))
            assert torch.equal(got, ref), (scheme, spread)
    with pytest.raises(ValueError, match="unknown resampling scheme"):
        draw_checked_positive(LOG_W, 4, "residual")
