"""The sampler against exact answers on the toy world (paper-spec §3 and §11)."""

import math

import pytest
import torch

from smclm.evaluators.exact import solve
from smclm.models.loading import build_twist
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import ParticleCollapseError, init, run_smc, sample_categorical, step
from smclm.smc.sampler import ess as ess_of
from smclm.tasks.base import Task
from smclm.tasks.toy import build_toy_task

SCHEMES = ["multinomial", "systematic", "stratified"]
T = 3


@pytest.fixture(scope="module")
def world(toy_world):
    """A toy model with a random (non-trivial) MLP twist, an exp-count task and its solution."""
    base, tok = toy_world
    torch.manual_seed(1)
    twist = build_twist("head", base, head="mlp")
    with torch.no_grad():  # move q away from p₀ so the tests exercise the twist
        twist.head.net[-1].weight.normal_(0, 0.05)  # exact KL(σ‖q) ≈ 0.64 (p₀: 0.31)
    model = TwistedLM(base, twist)
    prompt = torch.tensor([0, 1])  # "the cat"
    task = build_toy_task(prompt, T, "exp_count", [9, 11], 12, beta=2.0)
    return model, task, solve(model, task)


def _log_z_hats(model, task, n, reps, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(
        [
            run_smc(model, task.prompt_ids, T, task.bind(), n, generator=gen, **kw).log_z_hat
            for _ in range(reps)
        ],
        dtype=torch.float64,
    )


@pytest.mark.parametrize(
    "scheme,ess", [("multinomial", 0.0)] + [(s, 1.0) for s in SCHEMES] + [("systematic", 0.5)]
)
def test_z_hat_is_unbiased_and_log_z_hat_is_a_lower_bound(world, scheme, ess):
    model, task, sol = world
    log_z = _log_z_hats(model, task, 8, 300, seed=3, resampling=scheme, ess_threshold=ess)
    ratio = torch.exp(log_z - sol.log_z)
    se = ratio.std() / math.sqrt(ratio.numel())
    # k = 4 standard errors: E[Ẑ/Z] = 1 for SIS and for SMC with every resampling scheme.
    assert abs(float(ratio.mean()) - 1.0) < 4 * float(se), (float(ratio.mean()), float(se))
    # Jensen: E[log Ẑ] ≤ log Z (one-sided, k = 4 standard errors of the mean of log Ẑ).
    se_log = log_z.std() / math.sqrt(log_z.numel())
    assert float(log_z.mean()) <= sol.log_z + 4 * float(se_log)


def test_unbiasedness_test_can_fail(world):
    """A deliberately wrong Z (off by 0.3 nats) is rejected by the same 4-SE check."""
    model, task, sol = world
    ratio = torch.exp(_log_z_hats(model, task, 8, 300, seed=3) - (sol.log_z - 0.3))
    se = ratio.std() / math.sqrt(ratio.numel())
    assert abs(float(ratio.mean()) - 1.0) > 4 * float(se)


@pytest.mark.parametrize("scheme,ess", [(s, 1.0) for s in SCHEMES] + [("multinomial", 0.0)])
@pytest.mark.parametrize("potential", ["exp_count", "threshold"])
def test_optimal_twists_give_exact_log_z_and_equal_weights(toy_world, scheme, ess, potential):
    base, _ = toy_world
    task = build_toy_task(torch.tensor([0, 1]), 4, potential, [9], 12, min_count=2, beta=1.5)
    model = TwistedLM(base, None)
    sol = solve(model, task)
    opt = model.with_twist(sol.optimal_twist())
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        res = run_smc(
            opt,
            task.prompt_ids,
            4,
            task.bind(),
            16,
            resampling=scheme,
            ess_threshold=ess,
            generator=gen,
        )
        assert abs(res.log_z_hat - sol.log_z) < 1e-4
        assert float(res.log_w.max() - res.log_w.min()) < 1e-4
        for info in res.infos:
            assert abs(info.ess - 16) < 1e-3


def test_conditional_smc_is_an_upper_bound_and_keeps_the_pinned_sample(world):
    model, task, sol = world
    gen = torch.Generator().manual_seed(5)
    sigma = torch.exp(sol.log_sigma)
    ubs = []
    for _ in range(200):
        pinned = sol.sequences[torch.multinomial(sigma, 1, generator=gen)].squeeze(0)
        res = run_smc(model, task.prompt_ids, T, task.bind(), 4, pinned=pinned, generator=gen)
        assert torch.equal(res.tokens[0], pinned)
        ubs.append(res.log_z_hat)
    ub = torch.tensor(ubs, dtype=torch.float64)
    # One-sided, k = 4 standard errors: E[log Ẑ_cSMC] ≥ log Z.
    assert float(ub.mean()) >= sol.log_z - 4 * float(ub.std() / math.sqrt(ub.numel()))
    lb = _log_z_hats(model, task, 4, 200, seed=5)
    assert float(ub.mean()) > float(lb.mean())


@pytest.mark.parametrize("kind", ["head", "separate"])
def test_sampling_log_probs_match_teacher_forced_recomputation(toy_world, kind):
    """log q and log p₀ accumulated with the KV cache (and cache reordering after every
    resample) equal one teacher-forced pass over the final particles."""
    base, _ = toy_world
    torch.manual_seed(2)
    twist = build_twist(kind, base, head="mlp")
    with torch.no_grad():
        twist.head.net[-1].weight.normal_(0, 0.5)
        if kind == "separate":
            for p in twist.body.parameters():
                p.add_(0.05 * torch.randn_like(p))
    model = TwistedLM(base, twist)
    task = build_toy_task(torch.tensor([0, 1]), 6, "exp_count", [9], 12, beta=1.0)
    for ess in (0.0, 1.0):
        res = run_smc(
            model,
            task.prompt_ids,
            6,
            task.bind(),
            32,
            ess_threshold=ess,
            generator=torch.Generator().manual_seed(0),
        )
        if ess == 1.0:
            assert all(i.resampled for i in res.infos[:-1])
            assert any(i.n_unique < 32 for i in res.infos[:-1])
        tf = model.sequence_log_probs(task.prompt_ids, res.tokens)
        torch.testing.assert_close(res.log_q, tf["log_q"].sum(1), atol=1e-4, rtol=0)
        torch.testing.assert_close(res.log_p0, tf["log_p0"].sum(1), atol=1e-4, rtol=0)
        if ess == 0.0:  # SIS weights telescope to log p₀ + log φ − log q
            expect = tf["log_p0"].sum(1) + task.log_phi(res.tokens) - tf["log_q"].sum(1)
            torch.testing.assert_close(res.log_w, expect, atol=1e-4, rtol=0)


def test_step_info_follows_the_ess_rule(world):
    model, task, _ = world
    gen = torch.Generator().manual_seed(0)
    sis = run_smc(model, task.prompt_ids, T, task.bind(), 16, ess_threshold=0.0, generator=gen)
    assert not any(i.resampled for i in sis.infos)
    every = run_smc(model, task.prompt_ids, T, task.bind(), 16, ess_threshold=1.0, generator=gen)
    assert [i.resampled for i in every.infos] == [True] * (T - 1) + [False]
    half = run_smc(model, task.prompt_ids, T, task.bind(), 16, ess_threshold=0.5, generator=gen)
    for info in half.infos[:-1]:
        assert info.resampled == (info.ess < 8)
        assert 1 <= info.n_unique <= 16


def test_all_particles_dead_raises_a_named_error(world):
    model, task, _ = world
    dead = Task("dead", task.prompt_ids, T, lambda s, c=None: torch.full((s.shape[0],), -math.inf))
    with pytest.raises(ParticleCollapseError, match=f"step {T}.*smc.n_particles"):
        run_smc(model, dead.prompt_ids, T, dead.bind(), 8, generator=torch.Generator())


def test_step_info_values_match_the_weights(world):
    """Without resampling the weights stay in the state: ESS and log Ẑ increments recomputed from
    them equal what the steps report (plain Python numbers), and log Ẑ is their sum."""
    model, task, _ = world
    gen = torch.Generator().manual_seed(3)
    state = init(model, task.prompt_ids, 16)
    prev = state.log_w
    for _ in range(T):
        state = step(model, state, T, task.bind(), ess_threshold=0.0, generator=gen)
        info = state.infos[-1]
        assert type(info.ess) is float and type(info.log_z_increment) is float
        assert type(info.n_unique) is int and info.resampled is False and info.n_unique == 16
        assert abs(info.ess - ess_of(state.log_w)) < 1e-6 * 16
        inc = torch.logsumexp(state.log_w.double(), 0) - torch.logsumexp(prev.double(), 0)
        assert abs(info.log_z_increment - float(inc)) < 1e-5
        prev = state.log_w
    total = sum(i.log_z_increment for i in state.infos)
    assert abs(float(state.log_z_hat) - total) < 1e-4


def test_nan_weights_raise_floating_point_error(world):
    model, task, _ = world
    nan = Task("nan", task.prompt_ids, T, lambda s, c=None: torch.full((s.shape[0],), math.nan))
    # a NaN potential is caught where it is evaluated (t = T), before it reaches the weights
    with pytest.raises(
        FloatingPointError, match=rf"NaN for 8 and \+inf for 0 of 8 particles at step t = T = {T}"
    ):
        run_smc(model, nan.prompt_ids, T, nan.bind(), 8, generator=torch.Generator())


def test_sample_categorical_draws_from_the_rows_distributions():
    """Each row's draws follow softmax(row): frequencies within 4 standard errors (k = 4) over
    40,000 draws per row; zero-probability entries (-inf) are never drawn, and a row given as
    log-probs off by a constant (as rounding leaves them) is drawn from the same distribution."""
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0],
                          [0.05, 0.05, 0.1, 0.6, 0.2]])  # fmt: skip
    log_p = torch.log(probs)
    log_p[2] += 1e-3  # not exactly normalised
    n = 40_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(log_p, gen) for _ in range(n)])  # [n, rows]
    for r in range(probs.shape[0]):
        freq = torch.bincount(draws[:, r], minlength=5).double() / n
        se = (probs[r].double() * (1 - probs[r].double()) / n).sqrt()
        assert ((freq - probs[r]).abs() <= 4 * se + 1e-12).all(), (r, freq)
        assert (freq[probs[r] == 0] == 0).all()
