"""Tests for smclm.evaluators.bounds against the enumeration oracle on the toy world.

Statistical checks use a fixed generator seed and tolerances of K_SE standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from smclm.evaluators.bounds import (
    BOUND_NAMES,
    evaluate_bounds,
    exact_sample_log_weights,
    log_z_midpoint,
)
from smclm.evaluators.exact import exact_metrics, solve
from smclm.models.toy import build_toy_model
from smclm.models.twist import Head, HeadTwist, TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.toy import build_toy_task

V, T = 8, 4
PROMPT = torch.tensor([1, 2])
K_SE = 3.0  # tolerance in standard errors: a two-sided false alarm has probability ~0.3%
N_EXACT = 30  # repetitions (exact samples) the bounds are averaged over


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run much faster single-threaded (and do not fight other test processes)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> TwistedLM:
    return TwistedLM(build_toy_model(vocab_size=V, seed=0))


@pytest.fixture(scope="module")
def threshold(model):
    """The indicator task (≥ 1 token 3): under p₀, misses have log w = log 1e-16 ≈ −37."""
    task = build_toy_task(PROMPT, T, "threshold", [3], V, min_count=1)
    return task, solve(model, task)


@pytest.fixture(scope="module")
def exp_count(model):
    """A smooth potential log φ = #{tokens in {3, 5}}: finite-variance weights for KL tests."""
    task = build_toy_task(PROMPT, T, "exp_count", [3, 5], V, beta=1.0)
    return task, solve(model, task)


def exact_draws(sol, n: int, seed: int) -> torch.Tensor:
    """n exact σ samples drawn from the enumeration (independent of rejection sampling)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(sol.log_sigma.exp(), n, replacement=True, generator=gen)
    return sol.sequences[idx]


def noisy_twist(sol, scale: float = 0.7, seed: int = 123) -> TabularTwist:
    """ψ* perturbed by Gaussian noise: a twist with a known, non-trivial KL."""
    gen = torch.Generator().manual_seed(seed)
    return TabularTwist(
        [t + scale * torch.randn(t.shape, generator=gen) for t in sol.psi_star_tables()]
    )


def zero_head_twist(model) -> HeadTwist:
    """An untrained head: its output layer starts at zero, so q = p₀ exactly."""
    d = model.base.config.hidden_size
    return HeadTwist(Head(d, V, kind="mlp"))


@pytest.mark.parametrize("twist", ["untrained", "noisy"])
def test_bounds_sandwich_log_z_and_gaps_shrink(model, threshold, twist):
    task, sol = threshold
    tw = None if twist == "untrained" else noisy_twist(sol)
    m = model.with_twist(tw)
    out = evaluate_bounds(
        m,
        task,
        exact_draws(sol, N_EXACT, 0),
        particles=[4, 16],
        n_exact=N_EXACT,
        generator=torch.Generator().manual_seed(0),
    )
    for prefix in ("bounds", "bounds_p0"):
        for k in (4, 16):
            for b in BOUND_NAMES:
                val = out[f"{prefix}/k{k}/log_z_{b}"]
                se = out[f"{prefix}/k{k}/log_z_{b}_se"]
                if b.startswith("lower"):
                    assert val <= sol.log_z + K_SE * se, (prefix, k, b, val, se, sol.log_z)
                else:
                    assert val >= sol.log_z - K_SE * se, (prefix, k, b, val, se, sol.log_z)
    if twist == "untrained":
        # q = p₀ puts ~1/5 of its particles on misses (log w ≈ −37): at K = 4 the gaps are ~15
        # nats and at K = 16 ~1, far beyond the noise.
        for prefix in ("bounds", "bounds_p0"):
            for kind in ("sis", "smc"):
                gap = {
                    k: out[f"{prefix}/k{k}/log_z_upper_{kind}"]
                    - out[f"{prefix}/k{k}/log_z_lower_{kind}"]
                    for k in (4, 16)
                }
                assert gap[16] < gap[4], (prefix, kind, gap)


@pytest.mark.parametrize("twist", ["none", "zero_head", "optimal", "noisy"])
def test_kl_estimates_match_exact(model, exp_count, twist):
    task, sol = exp_count
    tw = {
        "none": None,
        "zero_head": zero_head_twist(model),
        "optimal": sol.optimal_twist(),
        "noisy": noisy_twist(sol),
    }[twist]
    m = model.with_twist(tw)
    exact = exact_metrics(m, task, sol)
    out = evaluate_bounds(
        m,
        task,
        exact_draws(sol, 200, 1),
        particles=[16],
        n_exact=N_EXACT,
        generator=torch.Generator().manual_seed(1),
        proposals=("twist",),
        log_z_exact=sol.log_z,
    )
    assert out["log_z/estimate_source"] == "exact"
    assert out["log_z/estimate"] == out["log_z/exact"] == sol.log_z
    # With the exact log Z both estimates are unbiased; their se is that of F_q resp. G_q.
    d_q = abs(out["kl/q_sigma"] - exact["kl/q_sigma_exact"])
    d_s = abs(out["kl/sigma_q"] - exact["kl/sigma_q_exact"])
    assert d_q <= max(0.1, K_SE * out["bounds/f_q_se"]), (d_q, out["bounds/f_q_se"])
    assert d_s <= max(0.1, K_SE * out["bounds/g_q_se"]), (d_s, out["bounds/g_q_se"])
    if twist == "noisy":  # the test distinguishes this twist from a good one
        assert exact["kl/q_sigma_exact"] > 0.3 and out["kl/q_sigma"] > 0.2
    if twist == "optimal":  # q = σ: every log-weight is log Z (zero variance, paper Prop. A.2)
        assert out["bounds/f_q_se"] < 1e-5 and abs(out["kl/q_sigma"]) < 1e-4


def test_optimal_twist_bounds_are_tight_and_midpoint_is_log_z(model, exp_count):
    task, sol = exp_count
    m = model.with_twist(sol.optimal_twist())
    out = evaluate_bounds(
        m,
        task,
        exact_draws(sol, 20, 2),
        particles=[2, 8],
        n_exact=20,
        generator=torch.Generator().manual_seed(2),
        n_g_q=10,
    )
    # q^twist = σ: SIS and SMC with the twisted proposal give log Z exactly, both directions.
    for k in (2, 8):
        for b in BOUND_NAMES:
            assert abs(out[f"bounds/k{k}/log_z_{b}"] - sol.log_z) < 1e-4
    assert out["log_z/estimate_source"] in ("smc_midpoint", "sis_midpoint")
    assert abs(out["log_z/estimate"] - sol.log_z) < 1e-4
    assert "log_z/exact" not in out
    assert abs(out["kl/q_sigma"]) < 1e-4 and abs(out["kl/sigma_q"]) < 1e-4


def test_midpoint_estimate_and_keys(model, exp_count):
    task, sol = exp_count
    m = model.with_twist(noisy_twist(sol))
    out = evaluate_bounds(
        m,
        task,
        exact_draws(sol, 40, 3),
        particles=[8, 2],
        n_exact=20,
        generator=torch.Generator().manual_seed(3),
        progress=True,
    )
    for prefix in ("bounds", "bounds_p0"):
        for b in BOUND_NAMES:
            for suffix in ("", "_se"):
                for k in (2, 8):
                    assert math.isfinite(out[f"{prefix}/k{k}/log_z_{b}{suffix}"])
                # un-suffixed keys are the largest K
                assert out[f"{prefix}/log_z_{b}{suffix}"] == out[f"{prefix}/k8/log_z_{b}{suffix}"]
    for key in ("bounds/f_q", "bounds/f_q_se", "bounds/g_q", "bounds/g_q_se"):
        assert math.isfinite(out[key])
    mid, source = log_z_midpoint(out)
    assert (out["log_z/estimate"], out["log_z/estimate_source"]) == (mid, source)
    pair = "smc" if source == "smc_midpoint" else "sis"
    lo, up = out[f"bounds/log_z_lower_{pair}"], out[f"bounds/log_z_upper_{pair}"]
    other = "sis" if pair == "smc" else "smc"
    assert up - lo <= out[f"bounds/log_z_upper_{other}"] - out[f"bounds/log_z_lower_{other}"]
    assert mid == pytest.approx((lo + up) / 2)
    # the midpoint is within half a gap (plus noise) of log Z
    se = math.hypot(out[f"bounds/log_z_lower_{pair}_se"], out[f"bounds/log_z_upper_{pair}_se"])
    assert abs(mid - sol.log_z) <= abs(up - lo) / 2 + K_SE * se
    assert out["kl/q_sigma"] == pytest.approx(out["log_z/estimate"] - out["bounds/f_q"])
    assert out["kl/sigma_q"] == pytest.approx(out["bounds/g_q"] - out["log_z/estimate"])
    # G_q pools all 40 exact samples when n_g_q is None
    g = exact_sample_log_weights(m, task, exact_draws(sol, 40, 3))
    assert out["bounds/g_q"] == pytest.approx(float(g.mean()))


def test_exact_sample_log_weights_match_enumeration(model, exp_count):
    task, sol = exp_count
    m = model.with_twist(noisy_twist(sol))
    idx = torch.tensor([0, 17, 511, 4095])
    log_w = exact_sample_log_weights(m, task, sol.sequences[idx], batch_size=3)
    from smclm.evaluators.exact import sequence_log_q

    _, log_q = sequence_log_q(m, task.prompt_ids, sol.sequences[idx])
    expected = sol.log_p0[idx] + sol.log_phi[idx] - log_q
    torch.testing.assert_close(log_w, expected, atol=1e-4, rtol=0)
    # with proposal p0 the weight is φ
    log_w_p0 = exact_sample_log_weights(m, task, sol.sequences[idx], proposal="p0")
    torch.testing.assert_close(log_w_p0, sol.log_phi[idx], atol=1e-4, rtol=0)


def test_single_particle_and_shared_cond(model, exp_count):
    task, sol = exp_count
    ex = exact_draws(sol, 3, 4)
    out = evaluate_bounds(
        model,
        task,
        ex,
        particles=[1],
        n_exact=1,
        generator=torch.Generator().manual_seed(4),
        cond=torch.tensor([5, 6]),  # a shared o: broadcast to every particle (φ ignores it here)
    )
    # K = 1: the upper bounds are the exact sample's own weight; se is undefined for n = 1
    w = float(exact_sample_log_weights(model, task, ex[:1])[0])
    assert out["bounds/log_z_upper_sis"] == pytest.approx(w)
    assert out["bounds/log_z_upper_smc"] == pytest.approx(w)
    assert math.isnan(out["bounds/log_z_upper_sis_se"])


def test_one_pass_over_the_exact_samples_gives_each_proposals_weights(model, exp_count):
    """The exact samples' log w are computed once for both proposals and G_q: with K = 1 the
    upper bounds are the first exact sample's own weight under each proposal, as
    exact_sample_log_weights gives it per proposal (p₀: log φ), and G_q is the mean over n_g."""
    task, sol = exp_count
    m = model.with_twist(noisy_twist(sol))
    ex = exact_draws(sol, 6, 7)
    out = evaluate_bounds(
        m, task, ex, particles=[1], n_exact=2, n_g_q=5, proposals=("twist", "p0"),
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    for proposal, prefix in (("twist", "bounds"), ("p0", "bounds_p0")):
        w = exact_sample_log_weights(m, task, ex[:2], proposal=proposal)
        assert out[f"{prefix}/log_z_upper_sis"] == pytest.approx(float(w.mean()))
        assert out[f"{prefix}/log_z_upper_smc"] == pytest.approx(float(w.mean()))
    g = exact_sample_log_weights(m, task, ex[:5])
    assert out["bounds/g_q"] == pytest.approx(float(g.mean()))


def test_bad_arguments(model, exp_count):
    task, sol = exp_count
    ex = exact_draws(sol, 4, 5)
    gen = torch.Generator()
    with pytest.raises(ValueError, match="n_exact"):
        evaluate_bounds(model, task, ex, particles=[4], n_exact=5, generator=gen)
    with pytest.raises(ValueError, match="proposal"):
        evaluate_bounds(model, task, ex, particles=[4], n_exact=2, generator=gen, proposals=("p0",))
    with pytest.raises(ValueError, match="particles"):
        evaluate_bounds(model, task, ex, particles=[], n_exact=2, generator=gen)
    with pytest.raises(ValueError, match="cond"):
        evaluate_bounds(
            model,
            task,
            ex,
            particles=[2],
            n_exact=2,
            generator=gen,
            cond=torch.zeros(3, 2, dtype=torch.long),
        )


def test_a_constant_potential_is_reported(model, caplog):
    """φ that no output satisfies (the threshold never met: φ ≡ ε) makes σ = p₀, where every
    learner looks perfect; the solver says so. A potential that varies is not reported."""
    never = build_toy_task(PROMPT, T, "threshold", [3], V, min_count=T + 1)
    with caplog.at_level("WARNING", logger="smclm.evaluators.exact"):
        sol = solve(model, never)
    assert math.isclose(sol.log_z, math.log(1e-16), rel_tol=1e-6)  # log φ is float32
    assert [r.getMessage() for r in caplog.records if "σ is p₀ itself" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="smclm.evaluators.exact"):
        solve(model, build_toy_task(PROMPT, T, "threshold", [3], V, min_count=1))
    assert not caplog.records
