"""Batched SMC runs (``run_smc(..., n_runs=G)``): G independent runs of K particles as one batch.

The toy world throughout: its GPT-Neo (V = 12), prompt [0, 1], an infilling task whose o is the
c = 1 token after the T outputs (Z(o) = p₀(o | prompt), enumerable), a conditional MLP twist with
random weights, and six distinct o's (one per run). Statistical checks use k = 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import smclm.evaluators.bounds as bounds_mod
import smclm.methods.base as base_mod
from smclm.compute import ComputeMeter
from smclm.evaluators.bounds import evaluate_bounds
from smclm.evaluators.exact import solve
from smclm.methods import TrainContext, build_method
from smclm.models.cache import note_changed_rows
from smclm.models.loading import build_twist
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc
from smclm.tasks.base import Task
from smclm.tasks.infilling import InfillingPotential
from smclm.tasks.toy import build_toy_task

PROMPT = torch.tensor([0, 1])
T, G, K = 3, 6, 8
OS = torch.tensor([1, 0, 2, 10, 9, 11])  # one o per run (their log Z(o) are > 0.4 apart)
SCHEMES = ["multinomial", "systematic", "stratified"]


def _infilling(base, t_len: int = T, c: int = 1) -> Task:
    return Task("infilling", PROMPT, t_len, InfillingPotential(base, PROMPT), None, cond_len=c)


def _cond_model(base, scale: float, seed: int = 0) -> TwistedLM:
    torch.manual_seed(seed)
    twist = build_twist("head", base, head="mlp", conditional=True)
    nn.init.normal_(twist.head.net[-1].weight, 0.0, scale)  # an imperfect, non-trivial twist
    return TwistedLM(base, twist)


@pytest.fixture(scope="module")
def world(toy_world):
    base, _ = toy_world
    model, task = _cond_model(base, scale=0.05), _infilling(base)
    sols = [solve(model, task, cond=o.view(1, 1)) for o in OS]
    return model, task, sols


def _rows(os: Tensor, k: int) -> Tensor:
    return os.repeat_interleave(k)[:, None]


def _batched_log_z(model, task, reps, seed, pinned_fn=None, **kw) -> Tensor:
    """log Ẑ [reps, G] of reps batched calls of G runs (run g conditioned on OS[g])."""
    gen = torch.Generator().manual_seed(seed)
    cond = _rows(OS, K)
    out = []
    for _ in range(reps):
        pinned = None if pinned_fn is None else pinned_fn(gen)
        res = run_smc(
            model,
            PROMPT,
            T,
            task.bind(cond),
            K,
            cond=cond,
            n_runs=G,
            generator=gen,
            pinned=pinned,
            **kw,
        )
        if pinned is not None:  # slot 0 of every run carries its exact sample
            assert torch.equal(res.tokens[::K], pinned)
        out.append(res.log_z_hats)
    return torch.stack(out)


@pytest.mark.parametrize(
    "scheme,ess",
    [("multinomial", 0.0)] + [(s, 1.0) for s in SCHEMES] + [(s, 0.5) for s in SCHEMES],
)
def test_every_batched_run_is_an_exact_smc_run(world, scheme, ess):
    model, task, sols = world
    log_z = _batched_log_z(model, task, 200, seed=11, resampling=scheme, ess_threshold=ess)
    exact = torch.tensor([s.log_z for s in sols], dtype=torch.float64)
    for g in range(G):
        ratio = torch.exp(log_z[:, g] - exact[g])
        se = float(ratio.std() / math.sqrt(ratio.numel()))
        # k = 4 standard errors, run by run: E[Ẑ_g] = Z(o_g).
        assert abs(float(ratio.mean()) - 1.0) < 4 * se, (g, float(ratio.mean()), se)
        # The same check rejects another run's Z (the runs' log Z differ by > 0.4 nats).
        other = torch.exp(log_z[:, g] - exact[(g + 1) % G])
        se_o = float(other.std() / math.sqrt(other.numel()))
        assert abs(float(other.mean()) - 1.0) > 4 * se_o, g


def test_the_runs_have_distinct_log_z(world):
    """What the rejection check above relies on."""
    exact = sorted(s.log_z for s in world[2])
    assert min(b - a for a, b in zip(exact, exact[1:])) > 0.4


@pytest.mark.parametrize("ess,pinned", [(1.0, False), (0.5, False), (0.5, True), (1.0, True)])
def test_ancestors_and_conditioning_never_cross_runs(toy_world, ess, pinned):
    """Every resample keeps each run's ancestors in its own rows (slot 0 fixed for cSMC), runs
    that do not resample keep their rows, and each row's o encoding stays its run's."""
    base, _ = toy_world
    t_len = 6
    model, task = _cond_model(base, scale=0.8), _infilling(base, t_len)
    seen: list[Tensor] = []
    inner = model.reorder

    def record(ctx, anc):
        seen.append(anc.clone())
        inner(ctx, anc)

    model.reorder = record
    gen = torch.Generator().manual_seed(2)
    cond = _rows(OS, K)
    pins = torch.randint(0, 12, (G, t_len), generator=gen) if pinned else None
    res = run_smc(
        model,
        PROMPT,
        t_len,
        task.bind(cond),
        K,
        cond=cond,
        n_runs=G,
        ess_threshold=ess,
        generator=gen,
        pinned=pins,
    )
    assert len(seen) == sum(i.resampled for i in res.infos) > 0
    runs = torch.arange(G)[:, None]
    steps = [i for i in res.infos if i.resampled]
    for anc, info in zip(seen, steps):
        anc = anc.view(G, K)
        assert torch.equal(anc // K, runs.expand(G, K))  # within the run's own rows
        if pinned:
            assert torch.equal(anc[:, 0], runs[:, 0] * K)
        for g in range(G):
            if not info.resampled_runs[g]:
                assert torch.equal(anc[g], torch.arange(K) + g * K)
            assert info.n_unique_runs[g] == anc[g].unique().numel()
    if ess == 0.5:  # the adaptive rule made some runs resample while others did not
        assert any(0 < sum(i.resampled_runs) < G for i in res.infos)
    if pinned:
        assert torch.equal(res.tokens[::K], pins)
    # The twist's o encoding after all the reorders is still each run's own.
    enc = model.twist.encode_cond(OS[:, None])
    state_cond = _final_cond_h(model, task, cond, ess, pins, t_len)
    assert torch.equal(state_cond.view(G, K, -1), enc[:, None].expand(G, K, -1))


def _final_cond_h(model, task, cond, ess, pins, t_len) -> Tensor:
    from smclm.smc.sampler import init, step

    gen = torch.Generator().manual_seed(2)
    state = init(model, PROMPT, K, cond, n_runs=G)
    for _ in range(t_len):
        state = step(
            model, state, t_len, task.bind(cond), ess_threshold=ess, pinned=pins, generator=gen
        )
    return state.ctx.twist_state.cond_h


def test_pinned_runs_keep_their_exact_sample_and_bound_log_z_above(world):
    model, task, sols = world
    sigmas = [s.log_sigma.exp() for s in sols]

    def draw(gen):  # one exact sample of σ(· | o_g) per run
        return torch.stack(
            [s.sequences[torch.multinomial(p, 1, generator=gen)[0]] for s, p in zip(sols, sigmas)]
        )

    ub = _batched_log_z(model, task, 150, seed=5, pinned_fn=draw)
    lb = _batched_log_z(model, task, 150, seed=6)
    for g in range(G):
        se = float(ub[:, g].std() / math.sqrt(ub.shape[0]))
        # One-sided, k = 4 standard errors: E[log Ẑ_cSMC,g] ≥ log Z(o_g).
        assert float(ub[:, g].mean()) >= sols[g].log_z - 4 * se, g
        assert float(ub[:, g].mean()) > float(lb[:, g].mean()), g


def test_batched_runs_validate_their_inputs(world):
    model, task, _ = world
    cond = _rows(OS, K)
    with pytest.raises(ValueError, match=r"pinned must be \[T\] or \[G, T\]"):
        run_smc(model, PROMPT, T, task.bind(cond), K, cond=cond, n_runs=G, pinned=OS[:3, None])
    with pytest.raises(ValueError, match="one row per particle"):
        run_smc(model, PROMPT, T, task.bind(cond), K, cond=cond[:K], n_runs=G)


# -- G = 1 is the single run of before, bit for bit ----------------------------------------------
# A reference copy of the single-run sampler step and resamplers as they were before batching
# (smclm/smc/sampler.py and resampling.py at commit fefe17f), so the check stays meaningful when
# the sampler changes again.


def _ref_cdf(log_w):
    lw = log_w.detach().to(torch.float64)
    w = torch.softmax(lw, dim=0)
    cdf = torch.cumsum(w, dim=0)
    assert math.isfinite(cdf[-1].item())
    positive = w > 0
    last = torch.cumsum(positive, dim=0).argmax()
    cdf = torch.cummax(torch.where(positive, cdf, 0.0), dim=0).values
    return cdf / cdf[-1], last


_BELOW_ONE = float(torch.nextafter(torch.tensor(1.0).double(), torch.tensor(0.0).double()))


def _ref_invert(cdf, last, points):
    idx = torch.searchsorted(cdf, points.clamp(0.0, _BELOW_ONE), right=True)
    return torch.minimum(idx, last).to(torch.long)


def _ref_resample(scheme, log_w, n, gen):
    cdf, last = _ref_cdf(log_w)
    if scheme == "multinomial":
        return _ref_invert(cdf, last, torch.rand(n, generator=gen, dtype=torch.float64))
    u = torch.rand(1 if scheme == "systematic" else n, generator=gen, dtype=torch.float64)
    return _ref_invert(cdf, last, (torch.arange(n, dtype=torch.float64) + u) / n)


def _ref_arrange(anc):
    n = anc.shape[0]
    counts = torch.bincount(anc, minlength=n)
    dst = torch.nonzero(counts == 0).squeeze(1)
    src = torch.repeat_interleave(counts.sub_(1).clamp_(min=0), output_size=dst.shape[0])
    return torch.arange(n).index_copy_(0, dst, src), dst, src


def _ref_stats(log_w, prev):
    lw = log_w.double()
    m = lw.max()
    e = torch.exp(lw - m)
    m, s1, s2 = torch.stack([m, e.sum(), e.dot(e)]).tolist()
    lse = m + math.log(s1)
    lse_prev = (
        math.log(log_w.shape[0]) if prev is None else float(torch.logsumexp(prev.double(), 0))
    )
    return lse - lse_prev, s1 * s1 / s2


@torch.no_grad()
def _ref_run(model, prompt, t_len, log_phi, n, *, resampling, ess_threshold, pinned, cond, gen,
             temperature=1.0):  # fmt: skip
    from smclm.smc.sampler import sample_categorical

    ctx, dists = model.start(prompt, n, cond)
    zeros = torch.zeros(n)
    tokens = torch.zeros(n, 0, dtype=torch.long)
    log_w, log_gamma, log_p0, log_q, log_z = zeros, zeros.clone(), zeros.clone(), zeros.clone(),\
        zeros.sum()  # fmt: skip
    infos, prev_zero = [], True
    for t in range(1, t_len + 1):
        lp, lpsi = dists.log_p0, dists.log_psi
        log_q_all = torch.log_softmax(lp + lpsi, dim=-1)
        if temperature != 1.0:
            log_q_all = torch.log_softmax(log_q_all / temperature, dim=-1)
        s_t = sample_categorical(log_q_all, gen)
        if pinned is not None:
            s_t[0] = pinned[t - 1]
        idx = s_t[:, None]
        log_q_t = log_q_all.gather(1, idx).squeeze(1)
        new_p0 = log_p0 + lp.gather(1, idx).squeeze(1)
        tokens = torch.cat([tokens, idx], dim=1)
        if t < t_len:
            new_gamma = new_p0 + lpsi.gather(1, idx).squeeze(1)
        else:
            phi = log_phi.from_cache(model, ctx, tokens)
            new_gamma = new_p0 + (log_phi(tokens) if phi is None else phi).float()
        log_alpha = new_gamma - log_gamma - log_q_t
        new_w = log_alpha if prev_zero else log_w + log_alpha
        inc, w_ess = _ref_stats(new_w, None if prev_zero else log_w)
        log_w, log_gamma, log_p0, log_q = new_w, new_gamma, new_p0, log_q + log_q_t
        do = t < t_len and (ess_threshold >= 1 or (0 < ess_threshold and w_ess < ess_threshold * n))
        n_unique = n
        if do:
            if pinned is None:
                anc = _ref_resample(resampling, log_w, n, gen)
            else:
                anc = torch.cat([torch.zeros(1, dtype=torch.long),
                                 _ref_resample("multinomial", log_w, n - 1, gen)])  # fmt: skip
            anc, dst, src = _ref_arrange(anc)
            note_changed_rows(anc, dst, src)
            tokens, log_gamma, log_p0, log_q = (x.index_select(0, anc) for x in
                                                (tokens, log_gamma, log_p0, log_q))  # fmt: skip
            log_w = torch.zeros_like(log_w)
            model.reorder(ctx, anc)
            n_unique = n - dst.shape[0]
        prev_zero = do
        infos.append((do, n_unique, inc, w_ess))
        log_z = log_z + inc
        if t < t_len:
            dists = model.advance(ctx, tokens[:, -1].contiguous() if do else s_t)
    return tokens, log_w, log_gamma - log_p0, log_p0, log_q, float(log_z), infos


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ess", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case", ["plain", "pinned", "cond"])
def test_one_run_reproduces_the_single_run_sampler_bit_for_bit(world, toy_world, scheme, ess, case):
    model, task, _ = world
    t_len = 5
    if case == "cond":  # infilling: per-row o, the potential read from the KV cache
        task = _infilling(toy_world[0], t_len)
        cond = torch.full((16, 1), 4)
    else:
        base, cond = toy_world[0], None
        task = build_toy_task(PROMPT, t_len, "exp_count", [9, 11], 12, beta=2.0)
        torch.manual_seed(1)
        model = TwistedLM(base, build_twist("head", base, head="mlp"))
        nn.init.normal_(model.twist.head.net[-1].weight, 0.0, 0.3)
    pinned = torch.tensor([9, 11, 3, 4, 9]) if case == "pinned" else None
    temperature = 1.3 if case == "plain" and ess == 0.0 else 1.0
    kw = dict(resampling=scheme, ess_threshold=ess, pinned=pinned, temperature=temperature)
    for seed in range(2):
        ref = _ref_run(model, PROMPT, t_len, task.bind(cond), 16, cond=cond,
                       gen=torch.Generator().manual_seed(seed), **kw)  # fmt: skip
        got = run_smc(model, PROMPT, t_len, task.bind(cond), 16, cond=cond,
                      generator=torch.Generator().manual_seed(seed), **kw)  # fmt: skip
        for name, r in zip(("tokens", "log_w", "log_phi", "log_p0", "log_q"), ref):
            assert torch.equal(getattr(got, name), r), name
        assert got.log_z_hat == ref[5]
        assert [(i.resampled, i.n_unique, i.log_z_increment) for i in got.infos] == [
            r[:3] for r in ref[6]
        ]
        # ESS: Σe² is summed per run now (the reference used a dot product): last bits only.
        for i, r in zip(got.infos, ref[6]):
            assert abs(i.ess - r[3]) <= 1e-12 * r[3]
        if ess == 1.0:
            assert all(i.resampled for i in got.infos[:-1])


# -- batched bounds equal the per-sample loop ----------------------------------------------------


def _check_batched_vs_looped(batched: dict, looped: dict, log_z: float) -> None:
    k = 4  # standard errors (of the difference; and for bracketing log Z)
    for b in ("lower_smc", "upper_smc", "lower_sis", "upper_sis"):
        key = f"bounds/log_z_{b}"
        diff = batched[key] - looped[key]
        se = math.hypot(batched[key + "_se"], looped[key + "_se"])
        assert abs(diff) <= k * se, (b, batched[key], looped[key], se)
        for m in (batched, looped):
            if b.startswith("lower"):
                assert m[key] <= log_z + k * m[key + "_se"], (b, m[key], log_z)
            else:
                assert m[key] >= log_z - k * m[key + "_se"], (b, m[key], log_z)


def test_batched_bounds_equal_the_per_sample_loop_on_the_toy_world(toy_world):
    base, _ = toy_world
    torch.manual_seed(1)
    model = TwistedLM(base, build_twist("head", base, head="mlp"))
    nn.init.normal_(model.twist.head.net[-1].weight, 0.0, 0.3)
    task = build_toy_task(PROMPT, T, "exp_count", [9, 11], 12, beta=2.0)
    sol = solve(model, task)
    gen = torch.Generator().manual_seed(0)
    exact = sol.sequences[torch.multinomial(sol.log_sigma.exp(), 40, True, generator=gen)]
    args = dict(particles=[4], n_exact=40, proposals=("twist",))
    batched = evaluate_bounds(model, task, exact, generator=gen, **args)
    looped = evaluate_bounds(model, task, exact, generator=gen, smc_runs_per_call=1, **args)
    _check_batched_vs_looped(batched, looped, sol.log_z)
    # A particle budget below G·K splits the runs into chunks: same estimator.
    small = evaluate_bounds(model, task, exact, generator=gen, max_batch_particles=12, **args)
    _check_batched_vs_looped(small, looped, sol.log_z)


def test_batched_bounds_equal_the_per_sample_loop_on_a_conditional_gpt_neo(tiny_lm_dirs):
    from smclm.models.loading import load_base_model

    base, _ = load_base_model(tiny_lm_dirs["gpt_neo"])
    model, task = _cond_model(base, scale=0.3), _infilling(base, 2, 2)
    gen = torch.Generator().manual_seed(3)
    s, o = task.sample_joint(model, 30, gen)  # exact (s, o) pairs, o differs between samples
    log_z = sum(solve(model, task, cond=o[i : i + 1]).log_z for i in range(30)) / 30
    args = dict(particles=[4], n_exact=30, proposals=("twist",), cond=o)
    batched = evaluate_bounds(model, task, s, generator=gen, **args)
    looped = evaluate_bounds(model, task, s, generator=gen, smc_runs_per_call=1, **args)
    # Each per-sample bound brackets its log Z(o_i), so the means bracket the mean log Z(o_i).
    _check_batched_vs_looped(batched, looped, log_z)


def test_one_call_runs_sis_smc_and_conditional_smc_runs_each_as_its_kind(world):
    """Runs of three kinds in one sampler call (per-run ess_threshold, a −1 pin row for the
    unpinned ones): the SIS run never resamples, the SMC and cSMC runs resample at every t < T,
    and only the cSMC run's slot 0 carries its pinned sample."""
    model, task, _ = world
    o = torch.tensor([[OS[0]], [OS[1]], [OS[2]]]).repeat_interleave(K, dim=0)
    pin = torch.tensor([5, 6, 7])
    pinned = torch.stack([torch.full((T,), -1), torch.full((T,), -1), pin])
    res = run_smc(
        model, PROMPT, T, task.bind(o), K, cond=o, n_runs=3, ess_threshold=[0.0, 1.0, 1.0],
        pinned=pinned, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for info in res.infos[:-1]:
        assert info.resampled_runs == (False, True, True)
    assert torch.equal(res.tokens[2 * K], pin)
    unpinned = res.tokens[[0, K]]
    assert not (unpinned == -1).any()
    with pytest.raises(ValueError, match="one per run"):
        run_smc(model, PROMPT, T, task.bind(o), K, cond=o, n_runs=3, ess_threshold=[0.0, 1.0])
    half = torch.stack([torch.tensor([5, -1, 7]), pin, pin])
    with pytest.raises(ValueError, match="all −1 for an unpinned run"):
        run_smc(model, PROMPT, T, task.bind(o), K, cond=o, n_runs=3, pinned=half)


def test_exact_sample_terms_through_the_cache_equal_the_teacher_forced_pass(tiny_lm_dirs):
    """Infilling's exact-sample log-weights (twisted proposal) computed the sampler's way (the
    prompt once, cached steps, φ from the KV cache) equal exact_sample_log_weights' teacher-forced
    pass and separate φ pass, on a GPT-Neo of the real architecture (float32); with M rows of o
    and with one row for every sample."""
    from smclm.models.loading import load_base_model

    base, _ = load_base_model(tiny_lm_dirs["gpt_neo"])
    model, task = _cond_model(base, scale=0.3), _infilling(base, 3, 2)
    s, o = task.sample_joint(model, 12, torch.Generator().manual_seed(5))
    assert bounds_mod._forced_through_cache(model, task, s, o) is not None  # the path taken
    terms = bounds_mod._exact_sample_terms(model, task, s, o)
    full = bounds_mod.exact_sample_log_weights(model, task, s, cond=o)
    assert torch.allclose(terms["twist"], full, atol=1e-4), (terms["twist"] - full).abs().max()
    phi = task.log_phi(s, o).double()
    assert torch.allclose(terms["p0"], phi, atol=1e-4)
    # one o for every sample (a [1, c] cond) is every sample's o, as in the teacher-forced pass
    one = bounds_mod._exact_sample_terms(model, task, s, o[:1])["twist"]
    full_one = bounds_mod.exact_sample_log_weights(model, task, s, cond=o[:1])
    assert torch.allclose(one, full_one, atol=1e-4), (one - full_one).abs().max()


# -- one sampler call per sweep (compute counters) -----------------------------------------------


def _spy(monkeypatch, module, meter: ComputeMeter) -> list[float]:
    """Record the base forward calls of every run_smc call made through ``module``."""
    calls: list[float] = []
    inner = module.run_smc

    def counted(*args, **kwargs):
        before = meter.step["base_forward_calls"]
        out = inner(*args, **kwargs)
        calls.append(meter.step["base_forward_calls"] - before)
        return out

    monkeypatch.setattr(module, "run_smc", counted)
    return calls


def _infilling_batch(toy_world, n_o: int = 25, per_o: int = 4):
    base, _ = toy_world
    model, task = _cond_model(base, scale=0.3), _infilling(base, 15, 10)
    gen = torch.Generator().manual_seed(0)
    s, o = task.sample_joint(model, n_o, gen)
    batch = TrainContext(model, task, n_o * per_o, gen, group_size=per_o)
    batch.cond = o.repeat_interleave(per_o, dim=0)
    batch.exact_pool = s.repeat_interleave(per_o, dim=0)
    meter = ComputeMeter()
    meter.watch("base", model.base.base_model)
    meter.watch("twist", model.twist)
    meter.watch_task(task)
    batch.meter = meter
    return batch, meter


def test_infilling_ctl_makes_one_sampler_call_per_sweep(toy_world, monkeypatch):
    """25 o × 4 particles, T = 15, c = 10 (the paper's infilling CTL): the SIS sweep and the
    cSMC sweep (25 pinned runs) are one sampler call each, of T + 1 base passes (the prompt, T − 1
    steps, the potential's c tokens from the cache) plus, in the first, one encoding of the o's
    by the twist (the second finds them in the head's memo of the frozen body's g(o)) — not
    25 · (T + 2)."""
    batch, meter = _infilling_batch(toy_world)
    calls = _spy(monkeypatch, base_mod, meter)
    meter.begin()
    build_method("ctl", positives="csmc").loss(batch)
    meter.end()
    t_len = batch.task.output_len
    assert calls == [t_len + 2, t_len + 1]


def test_each_bound_run_of_the_sweep_conditions_on_its_own_exact_pair(toy_world, monkeypatch):
    """With more exact pairs than n_exact (12 and 4, as a profile's G_q pairs and its bound
    runs), run j of every kind (SIS, SMC, cSMC) is conditioned on o_j, and the cSMC run that pins
    s_j pins it under its own o_j: the upper bound needs s_j ~ σ(· | o_j) in its run."""
    batch, _ = _infilling_batch(toy_world, n_o=12, per_o=1)
    s, o = batch.exact_pool, batch.cond
    seen: list[tuple[Tensor, Tensor | None, int]] = []
    inner = bounds_mod.run_smc

    def spy(*args, **kwargs):
        seen.append((kwargs["cond"].cpu(), kwargs.get("pinned"), kwargs["n_runs"]))
        return inner(*args, **kwargs)

    monkeypatch.setattr(bounds_mod, "run_smc", spy)
    k, n_exact = 3, 4
    evaluate_bounds(batch.model, batch.task, s, particles=[k], n_exact=n_exact,
                    generator=batch.generator, proposals=("twist",), cond=o)  # fmt: skip
    cond = torch.cat([c for c, _, _ in seen]).view(-1, k, o.shape[1])  # [runs, K, c]
    assert cond.shape[0] == 3 * n_exact  # SIS, SMC and cSMC runs of the n_exact pairs
    assert bool((cond == cond[:, :1]).all())  # a run's particles share their o
    want = o[:n_exact].repeat(3, 1)
    assert torch.equal(cond[:, 0], want), (cond[:, 0].tolist(), want.tolist())
    pinned = torch.cat([p.cpu() for _, p, _ in seen if p is not None])
    csmc = pinned[2 * n_exact :]
    assert bool((pinned[: 2 * n_exact] == -1).all())
    assert torch.equal(csmc, s[:n_exact].cpu())  # s_j pinned in run j, whose o is o_j (above)


def test_bounds_make_one_sampler_call_for_the_three_sweeps_of_20_exact_samples(
    toy_world, monkeypatch
):
    """The 20 SIS runs, 20 SMC runs and 20 cSMC runs of one K (each with its o) go through the
    sampler as one call of 60 runs with their own resampling thresholds and pins: T + 1 base
    passes in all (the o's encoding is in the head's memo of the frozen body's g(o) by then: the
    exact samples' terms, computed first, put it there), not 3 · (T + 2) (one call per kind) or
    60 · (T + 2)."""
    batch, meter = _infilling_batch(toy_world, n_o=20, per_o=1)
    calls = _spy(monkeypatch, bounds_mod, meter)
    meter.begin()
    s, o = batch.exact_pool, batch.cond
    evaluate_bounds(batch.model, batch.task, s, particles=[4], n_exact=20,
                    generator=batch.generator, proposals=("twist",), cond=o)  # fmt: skip
    meter.end()
    t_len = batch.task.output_len
    assert calls == [t_len + 1]  # SIS, SMC lower and cSMC upper runs together
