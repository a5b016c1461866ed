"""Variable-length outputs (stop tokens) against exact answers on the toy world (README
"Stopping"; DESIGN.md "Stopping").

σ̃(z) = p₀(z_1:ℓ)·φ(z) over finished sequences z_1:ℓ (z_ℓ a stop token, no earlier stop,
min_len ≤ ℓ ≤ T). Statistical checks use fixed seeds and tolerances of k standard errors with
the k stated at each assertion. Fixed-length behaviour (no stop tokens) is covered, unchanged,
by the rest of the suite (tests/test_smc.py, test_bounds.py, …), which this change leaves as it
was; the fixed-length sampler path was also checked bit for bit against the previous sampler.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from smclm.errors import ConfigError
from smclm.evaluators.bounds import evaluate_bounds, exact_sample_log_weights
from smclm.evaluators.exact import exact_metrics, solve
from smclm.models.loading import build_twist
from smclm.models.twist import TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import (
    Stopping,
    init,
    run_smc,
    step,
    stopped_sequence_log_probs,
)
from smclm.tasks.exact_samples import rejection_sample
from smclm.tasks.plugin import TaskEnv
from smclm.tasks.toy import build_toy_task, toy_task

V, T = 12, 4
PROMPT = torch.tensor([0, 1])  # "the cat"
STOPS = (2, 5)  # "dog", "a": together ~12% per step, so ~2/3 of p₀'s outputs reach the cap
TARGETS = [3, 6]
SCHEMES = ["multinomial", "systematic", "stratified"]


def make_task(stop_ids=STOPS, min_len=1, potential="exp_count", t_len=T):
    return build_toy_task(
        PROMPT, t_len, potential, TARGETS, V, beta=1.5, stop_ids=stop_ids, min_len=min_len
    )


@pytest.fixture(scope="module")
def p0_model(toy_world):
    return TwistedLM(toy_world[0])


@pytest.fixture(scope="module")
def twisted(toy_world):
    """The toy LM with a random (non-trivial) MLP twist: q^π ≠ p₀, and the twist gives every
    stop token its own value."""
    base, _ = toy_world
    torch.manual_seed(1)
    twist = build_twist("head", base, head="mlp")
    with torch.no_grad():  # exact KL(σ‖q) ≈ 0.8 on make_task(min_len=2) (p₀'s: 1.5)
        twist.head.net[-1].weight.normal_(0, 0.05)
    return TwistedLM(base, twist)


@pytest.fixture(scope="module")
def world(p0_model):
    task = make_task()
    return task, solve(p0_model, task)


def brute_force(base, stop_ids, min_len, t_len):
    """(log Z, number of finished sequences, log Z without the cap correction), float64, by
    plain loops over every finished sequence: the model's own forward pass (its logits) over
    prompt + z, log φ counted by hand."""
    pad_free = [v for v in range(V) if v not in stop_ids]
    terms, uncorrected, count = [], [], 0
    for ell in range(min_len, t_len + 1):
        seqs = [
            list(p) + [s] for p in itertools.product(pad_free, repeat=ell - 1) for s in stop_ids
        ]
        ids = torch.cat([PROMPT.expand(len(seqs), -1), torch.tensor(seqs)], dim=1)
        with torch.no_grad():
            logp = torch.log_softmax(base(input_ids=ids).logits.double(), dim=-1)
        start = PROMPT.numel() - 1
        for i, z in enumerate(seqs):
            log_p0 = sum(float(logp[i, start + j, z[j]]) for j in range(ell))
            log_phi = 1.5 * sum(tok in TARGETS for tok in z)
            terms.append(log_p0 + log_phi)
            # gfn-lm-tuning's forced stop: the stop at the cap counted as certain
            p_stop = float(torch.logsumexp(logp[i, start + ell - 1, list(stop_ids)], 0))
            uncorrected.append(terms[-1] - (p_stop if ell == t_len else 0.0))
            count += 1
    lse = lambda x: float(torch.logsumexp(torch.tensor(x, dtype=torch.float64), 0))  # noqa: E731
    return lse(terms), count, lse(uncorrected)


@pytest.mark.parametrize("stop_ids,min_len", [(STOPS, 1), ((5,), 2)])
def test_exact_evaluator_matches_a_brute_force(toy_world, p0_model, stop_ids, min_len):
    task = make_task(stop_ids, min_len)
    sol = solve(p0_model, task)
    log_z, count, _ = brute_force(toy_world[0], stop_ids, min_len, T)
    n_free = V - len(stop_ids)
    assert sol.sequences.shape == (count, T)
    assert count == sum(n_free ** (ell - 1) * len(stop_ids) for ell in range(min_len, T + 1))
    assert abs(sol.log_z - log_z) < 1e-5, (sol.log_z, log_z)
    lengths = sol.lengths
    assert int(lengths.min()) == min_len and int(lengths.max()) == T
    # padded with the first stop id after the stop; σ sums to 1 over the finished sequences
    after = torch.arange(1, T + 1)[None] > lengths[:, None]
    assert bool((sol.sequences[after] == stop_ids[0]).all())
    assert abs(float(sol.log_sigma.exp().sum()) - 1.0) < 1e-9


def test_optimal_twists_give_exact_log_z_and_sigma_lengths(p0_model, world):
    """With ψ* (stop entries = φ, 0 before min_len, non-stops 0 at the cap), q^π = σ: exact KL
    0, SMC weights all equal and log Ẑ = log Z in every run, and the particles' lengths follow
    σ's length distribution (k = 4 standard errors per length, 1,600 particles)."""
    task, sol = world
    opt = p0_model.with_twist(sol.optimal_twist())
    kl = exact_metrics(opt, task, sol)
    assert abs(kl["kl/q_sigma_exact"]) < 1e-5 and abs(kl["kl/sigma_q_exact"]) < 1e-5
    res = run_smc(
        opt, PROMPT, T, task.bind(), 16, n_runs=100, generator=torch.Generator().manual_seed(0)
    )
    assert float((res.log_z_hats - sol.log_z).abs().max()) < 1e-4
    spread = res.log_w.view(100, 16)
    assert float((spread.max(1).values - spread.min(1).values).max()) < 1e-4
    sigma = sol.log_sigma.exp()
    n = res.lengths.numel()
    for ell in range(1, T + 1):
        p = float(sigma[sol.lengths == ell].sum())
        freq = float((res.lengths == ell).double().mean())
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (ell, freq, p)


def _z_ratio(log_z_hats, log_z):
    ratio = torch.exp(log_z_hats.double() - log_z)
    return float(ratio.mean()), float(ratio.std() / math.sqrt(ratio.numel()))


@pytest.mark.parametrize(
    "scheme,ess", [("multinomial", 0.0)] + [(s, 1.0) for s in SCHEMES] + [("systematic", 0.5)]
)
def test_z_hat_is_unbiased_with_stopping(twisted, scheme, ess):
    """E[Ẑ] = Z for SIS and SMC with every resampler, min_len 2 (stops masked at step 1) and
    two stop tokens; 600 batched runs of 8 particles; k = 4 standard errors."""
    task = make_task(min_len=2)
    sol = solve(twisted, task)
    res = run_smc(
        twisted, PROMPT, T, task.bind(), 8, n_runs=600, resampling=scheme, ess_threshold=ess,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    mean, se = _z_ratio(res.log_z_hats, sol.log_z)
    assert abs(mean - 1.0) < 4 * se, (mean, se)
    assert int(res.lengths.min()) >= 2 and bool((res.lengths < T).any())


def test_the_forced_stop_at_the_cap_is_importance_corrected(toy_world, p0_model, world):
    """SIS from the masked p₀ proposal: E[w] = Z (k = 4 SE over 4,000 single-particle runs).
    Without the correction (the forced stop's p₀(⊤ | z_<T) dropped from the weight, as
    gfn-lm-tuning does) the mean lands on the brute force's uncorrected value instead, many
    standard errors away from Z: the test would fail without the correction."""
    task, sol = world
    log_z, _, log_z_uncorrected = brute_force(toy_world[0], STOPS, 1, T)
    assert log_z_uncorrected - log_z > 0.3  # ~2/3 of p₀'s mass reaches the cap
    res = run_smc(
        p0_model, PROMPT, T, task.bind(), 1, n_runs=4000, ess_threshold=0.0,
        generator=torch.Generator().manual_seed(11),
    )  # fmt: skip
    mean, se = _z_ratio(res.log_w, log_z)
    assert abs(mean - 1.0) < 4 * se, (mean, se)
    log_p0, _ = p0_model.forward_full(PROMPT, res.tokens)
    p_stop = torch.logsumexp(log_p0[:, T - 1, list(STOPS)], dim=-1)
    capped = res.lengths == T
    assert 0.5 < float(capped.double().mean()) < 0.8
    uncorrected = res.log_w - torch.where(capped, p_stop, torch.zeros_like(p_stop))
    mean_u, se_u = _z_ratio(uncorrected, log_z)
    assert abs(mean_u - 1.0) > 10 * se_u, (mean_u, se_u)  # wrong by > 10 SE
    mean_uu, se_uu = _z_ratio(uncorrected, log_z_uncorrected)
    assert abs(mean_uu - 1.0) < 4 * se_uu, (mean_uu, se_uu)  # and wrong exactly as predicted


def test_a_finished_particle_is_absorbing(twisted):
    """Step by step (SIS, 3 batched runs): once a particle has stopped its log-weight and log γ
    never change again, it holds the pad id, and log φ was evaluated once per particle, on its
    own z_1:ℓ ending in its stop."""
    task = make_task()
    calls: list[torch.Tensor] = []

    def log_phi(tokens):
        calls.append(tokens.clone())
        assert bool(Stopping(STOPS).is_stop(tokens[:, -1]).all())  # each row ends in its stop
        return task.log_phi(tokens)

    gen = torch.Generator().manual_seed(4)
    state = init(twisted, PROMPT, 16, n_runs=3, stopping=task.stopping)
    history = []
    while not state.done:
        state = step(twisted, state, T, log_phi, ess_threshold=0.0, generator=gen)
        history.append((state.log_w.clone(), state.log_gamma.clone(), state.finished.clone()))
    assert sum(c.shape[0] for c in calls) == 48  # every particle scored exactly once
    assert state.infos[-1].n_finished == 48
    final_w, final_gamma, _ = history[-1]
    for t, (log_w, log_gamma, finished) in enumerate(history, start=1):
        assert torch.equal(log_w[finished], final_w[finished])
        assert torch.equal(log_gamma[finished], final_gamma[finished])
        rows = finished.nonzero().squeeze(1)
        assert bool(Stopping(STOPS).is_stop(state.tokens[rows, t - 1]).all())
    assert not any(i.resampled for i in state.infos)


def test_the_run_ends_when_every_particle_has_finished(p0_model):
    """No forward pass after the last particle stops; the output is padded to T. A twist that
    favours the stop token by e^12 makes every particle stop at min_len = 2, long before T."""
    t_len = 5
    task = make_task(stop_ids=(5,), min_len=2, t_len=t_len)
    boost = [torch.zeros(V ** (t - 1), V).index_fill(1, torch.tensor([5]), 12.0)
             for t in range(1, t_len + 1)]  # fmt: skip
    model = p0_model.with_twist(TabularTwist(boost))
    calls = []
    advance = model.advance
    model.advance = lambda ctx, tokens: calls.append(1) or advance(ctx, tokens)  # type: ignore
    gen = torch.Generator().manual_seed(0)
    res = run_smc(model, PROMPT, t_len, task.bind(), 8, n_runs=2, generator=gen)
    assert bool((res.lengths == 2).all())
    assert len(res.infos) == 2 and len(calls) == 1  # s_1 fed once, nothing after the stops
    assert res.tokens.shape == (16, t_len) and bool((res.tokens[:, 1:] == 5).all())
    assert res.infos[-1].n_finished == 16 and not res.infos[-1].resampled


def test_conditional_smc_keeps_a_finished_pinned_sample(twisted, world):
    """cSMC with stopping: slot 0 of every run reproduces its exact sample (a stop, then pad),
    across resampling and batched runs; an unfinished sequence is refused as a pin."""
    task, sol = world
    gen = torch.Generator().manual_seed(8)
    idx = torch.multinomial(sol.log_sigma.exp(), 6, replacement=True, generator=gen)
    pins = sol.sequences[idx]
    res = run_smc(twisted, PROMPT, T, task.bind(), 4, n_runs=6, pinned=pins, generator=gen)
    assert torch.equal(res.tokens[::4], pins)
    assert torch.equal(res.lengths[::4], sol.lengths[idx])
    bad = torch.tensor([0, 1, 3, 4])  # no stop at all
    with pytest.raises(ValueError, match="must be finished sequences"):
        run_smc(twisted, PROMPT, T, task.bind(), 4, pinned=bad, generator=gen)


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_sampling_log_probs_match_teacher_forcing_with_stopping(toy_world, kind):
    """log p₀ and log q accumulated with the KV cache (reordered after every resample) equal
    the teacher-forced stopping pass over the final particles, and SIS weights telescope."""
    base, _ = toy_world
    torch.manual_seed(2)
    twist = build_twist(kind, base, head="mlp")
    with torch.no_grad():
        twist.head.net[-1].weight.normal_(0, 0.5)
    model = TwistedLM(base, twist)
    task = make_task(min_len=2, t_len=5)
    for ess in (0.0, 1.0):
        res = run_smc(
            model, PROMPT, 5, task.bind(), 32, ess_threshold=ess,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        if ess == 1.0:
            assert any(i.n_unique < 32 for i in res.infos[:-1])
        tf = stopped_sequence_log_probs(model, PROMPT, res.tokens, task.stopping)
        assert torch.equal(tf["lengths"], res.lengths)
        torch.testing.assert_close(res.log_q, tf["log_q"].sum(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(res.log_p0, tf["log_p0"].sum(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(res.log_phi, task.log_phi(res.tokens), atol=1e-4, rtol=0)
        if ess == 0.0:
            expect = exact_sample_log_weights(model, task, res.tokens).float()
            torch.testing.assert_close(res.log_w, expect, atol=1e-4, rtol=0)


def test_bounds_sandwich_log_z_with_stopping(p0_model, world):
    """The bounds evaluator on a stopping task with a noisy ψ* twist: SIS and SMC lower bounds
    below log Z, upper bounds (SIS with an exact sample, conditional SMC) above it, each within
    k = 3 standard errors over 30 exact samples; G_q − log Z and log Z − F_q estimate the exact
    KLs (k = 4 standard errors)."""
    task, sol = world
    gen = torch.Generator().manual_seed(123)
    twist = TabularTwist(
        [t + 0.7 * torch.randn(t.shape, generator=gen) for t in sol.psi_star_tables()]
    )
    model = p0_model.with_twist(twist)
    idx = torch.multinomial(sol.log_sigma.exp(), 400, replacement=True, generator=gen)
    exact = sol.sequences[idx]
    m = evaluate_bounds(
        model, task, exact, particles=[8], n_exact=30, generator=gen, proposals=("twist",),
        log_z_exact=sol.log_z,
    )  # fmt: skip
    for kind in ("sis", "smc"):
        lo, up = m[f"bounds/log_z_lower_{kind}"], m[f"bounds/log_z_upper_{kind}"]
        assert lo <= sol.log_z + 3 * m[f"bounds/log_z_lower_{kind}_se"], (kind, lo, sol.log_z)
        assert up >= sol.log_z - 3 * m[f"bounds/log_z_upper_{kind}_se"], (kind, up, sol.log_z)
        assert lo < up
    kl = exact_metrics(model, task, sol)
    assert abs(m["kl/sigma_q"] - kl["kl/sigma_q_exact"]) < 4 * m["bounds/g_q_se"]
    assert abs(m["kl/q_sigma"] - kl["kl/q_sigma_exact"]) < 4 * m["bounds/f_q_se"]


def test_rejection_sampling_draws_sigma_with_stopping(p0_model):
    """Exact samples by rejection from the masked p₀ proposal follow σ: every sample is a
    finished sequence, and each length's frequency is within k = 4 standard errors of σ's."""
    task = make_task(min_len=2, potential="threshold")
    sol = solve(p0_model, task)
    n = 600
    samples = rejection_sample(
        p0_model, task, n, batch_size=2048, generator=torch.Generator().manual_seed(5)
    )
    assert samples.shape == (n, T)
    valid = {tuple(s) for s in sol.sequences.tolist()}
    assert all(tuple(s) in valid for s in samples.tolist())
    lengths = task.stopping.lengths(samples)
    sigma = sol.log_sigma.exp()
    for ell in range(2, T + 1):
        p = float(sigma[sol.lengths == ell].sum())
        freq = float((lengths == ell).double().mean())
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (ell, freq, p)


def test_the_toy_task_resolves_stops_from_the_config(toy_world):
    base, tok = toy_world
    env = TaskEnv(tok, base, torch.device("cpu"), PROMPT)
    common = dict(name="toy", prompt="the cat", output_len=4, potential="threshold",
                  target_ids=[9])  # fmt: skip
    task = toy_task(env, stop=["end", 5], min_len=2, **common)
    assert task.stop_ids == (11, 5) and task.stopping == Stopping((11, 5), 2)
    assert toy_task(env, stop="end", **common).stop_ids == (11,)
    assert toy_task(env, stop=None, **common).stopping is None
    with pytest.raises(ConfigError, match="2 tokens"):
        toy_task(env, stop="the cat", **common)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        toy_task(env, stop=[40], **common)
    with pytest.raises(ValueError, match="min_len=5 is above the length cap"):
        toy_task(env, stop="end", min_len=5, **common)
    with pytest.raises(ValueError, match="needs stop tokens"):
        toy_task(env, min_len=2, **common)


def test_config_checks_the_stopping_keys():
    from omegaconf import OmegaConf

    from smclm.config import check_ranges

    def cfg(**task):
        return OmegaConf.create({"task": {"output_len": 4, **task}})

    check_ranges(cfg(stop=["end", 11], min_len=4))
    check_ranges(cfg(stop=None, min_len=1))
    with pytest.raises(ConfigError, match="task.min_len=0"):
        check_ranges(cfg(stop=[11], min_len=0))
    with pytest.raises(ConfigError, match="at most task.output_len=4"):
        check_ranges(cfg(stop=[11], min_len=5))
    with pytest.raises(ConfigError, match="task.stop="):
        check_ranges(cfg(stop=[-1]))
