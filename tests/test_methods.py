"""Twist learners (smclm.methods): registry, plumbing, gradients at the optimum, and learning.

The toy problem everywhere: the toy world with V = 10, prompt [0, 1], T = 3 (1000 sequences, so
everything is enumerable), and the threshold potential φ = 1[token 8 appears] + ε with ε = 1e-3
(P_p₀(token 8 appears) ≈ 0.02, so KL(σ‖p₀) ≈ 3.55 nats). ε = 1e-3 rather than the paper's 1e-16
keeps the RL targets log φ ≥ −6.9 (with −36.8 RL needs a much smaller step size to stay stable).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smclm.evaluators.exact import exact_metrics, solve
from smclm.methods import METHODS, TrainContext, build_method
from smclm.methods.fudge import log1mexp
from smclm.models.loading import build_twist
from smclm.models.toy import build_toy_model
from smclm.models.twist import TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.toy import build_toy_task

V, T, TARGET, EPS = 10, 3, 8, 1e-3
ALL = ("ctl", "dpg", "fudge", "rl", "sixo")
WITH_EXACT = ("ctl", "dpg", "rl", "sixo")


@pytest.fixture(scope="module")
def world():
    base = build_toy_model(vocab_size=V)
    task = build_toy_task(torch.tensor([0, 1]), T, "threshold", [TARGET], V, epsilon=EPS)
    sol = solve(TwistedLM(base), task)
    gen = torch.Generator().manual_seed(1234)
    pool = sol.sequences[torch.multinomial(sol.log_sigma.exp(), 512, True, generator=gen)]
    return base, task, sol, pool


def head_model(base, method: str, head: str = "mlp", seed: int = 0) -> TwistedLM:
    torch.manual_seed(seed)
    squash = "logsigmoid" if method == "fudge" else None
    return TwistedLM(base, build_twist("head", base, head=head, squash=squash))


class TrainableTable(TabularTwist):
    """TabularTwist whose log ψ_t tables are trainable parameters (same begin/advance/full)."""

    def __init__(self, tables: list[torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.tables = nn.ParameterList(nn.Parameter(t.clone().float()) for t in tables)
        self.vocab_size = tables[0].shape[-1]


# -- registry and plumbing ---------------------------------------------------------------------


def test_registry_names_and_unknown():
    assert sorted(METHODS) == sorted([*ALL, "gfn", "ppo", "sft"])
    with pytest.raises(
        ValueError,
        match="unknown method 'x'; choose one of: ctl, dpg, fudge, gfn, ppo, rl, sft, sixo",
    ):
        build_method("x")
    with pytest.raises(ValueError, match="does not take option"):
        build_method("ctl", temperature=1.0)
    for name in ALL:
        m = build_method(name)
        assert m.name == name and m.needs_exact is False
    for name in WITH_EXACT:
        assert build_method(name, positives="exact").needs_exact is True
    with pytest.raises(ValueError, match="positives"):
        build_method("fudge", positives="exact")
    with pytest.raises(ValueError, match="positives"):
        build_method("ctl", positives="smc")
    # the values the method config group passes are accepted
    build_method("fudge", positives="sis")
    build_method("sixo", positives="smc")


@pytest.mark.parametrize("name", ALL)
def test_loss_is_finite_scalar_with_grad(world, name):
    base, task, _, _ = world
    model = head_model(base, name)
    batch = TrainContext(model, task, 16, torch.Generator().manual_seed(0))
    loss, metrics = build_method(name).loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.grad_fn is not None
    assert metrics["train/loss"] == pytest.approx(float(loss.detach()))
    assert all(k.startswith("train/") and isinstance(v, float) for k, v in metrics.items())
    loss.backward()
    assert all(p.grad is None for p in base.parameters())  # only the twist gets gradients
    grads = [p.grad for p in model.twist.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", WITH_EXACT)
def test_exact_positives(world, name):
    base, task, _, pool = world
    model = head_model(base, name)
    method = build_method(name, positives="exact")
    batch = TrainContext(model, task, 16, torch.Generator().manual_seed(0), exact_pool=pool)
    loss, metrics = method.loss(batch)
    assert torch.isfinite(loss) and loss.grad_fn is not None and "train/loss" in metrics
    no_pool = TrainContext(model, task, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exact target samples"):
        method.loss(no_pool)


def test_fudge_rejects_unsquashed_twist(world):
    base, task, _, _ = world
    model = head_model(base, "ctl")  # squash=None: log ψ can be > 0
    with pytest.raises(ValueError, match="twist.squash=logsigmoid"):
        build_method("fudge").loss(TrainContext(model, task, 8, torch.Generator().manual_seed(0)))


def test_log1mexp_is_stable():
    x = torch.tensor([-30.0, -5.0, -math.log(2.0), -0.1, -1e-4, -1e-9, 0.0], requires_grad=True)
    y = log1mexp(x)
    ref = torch.log(-torch.expm1(x.detach().double().clamp(max=-1e-6))).float()
    assert torch.allclose(y.detach(), ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_rl_rejects_infinite_log_phi(world):
    base, _, _, _ = world
    task = build_toy_task(torch.tensor([0, 1]), T, "threshold", [TARGET], V, epsilon=0.0)
    batch = TrainContext(head_model(base, "rl"), task, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="epsilon"):
        build_method("rl").loss(batch)


# -- gradient at the optimal twist --------------------------------------------------------------


def _batch_grads(model: TwistedLM, task, name: str, n_batches: int, k: int, seed: int):
    """Flattened twist-table gradients [n_batches, D] of n_batches seeded batches, and the losses."""
    method = build_method(name)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.twist.parameters())
    grads, losses = [], []
    for _ in range(n_batches):
        loss, _ = method.loss(TrainContext(model, task, k, gen))
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append(
            torch.cat(
                [
                    (x if x is not None else torch.zeros_like(p)).reshape(-1)
                    for x, p in zip(g, params)
                ]
            ).double()
        )
        losses.append(float(loss.detach()))
    return torch.stack(grads), losses


def _mean_and_stderr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


@pytest.mark.parametrize("name", ["ctl", "rl", "dpg"])
def test_expected_gradient_vanishes_at_optimal_twist(world, name):
    """E[∇L] = 0 at ψ* (paper-spec §11), and the same estimate at a perturbed twist is not 0.

    Tested components: the gradient along the perturbation direction δ and along 15 random unit
    directions (sums of many table entries, so their batch means are close to normal), and, for
    CTL and RL, every table entry. At ψ* the CTL and RL per-batch gradients are exactly 0 up to
    float round-off (q^ψ* = σ_t makes every CTL weight uniform, so positives and negatives coincide;
    every RL target equals its value), so their entries need no normal approximation. DPG's
    per-batch gradient is 0 only in expectation, and a single entry is too skewed for a mean/stderr
    test: it is +q(v|prefix)/(KT) on every visit of the prefix and −(1−q)/(KT) on the rare visits
    of a low-probability v, which 48 batches mostly miss (seen: "z" up to 30 at ψ*).
    """
    base, task, sol, _ = world
    tables = sol.psi_star_tables()
    gen = torch.Generator().manual_seed(1)
    noise = [0.5 * torch.randn(t.shape, generator=gen) for t in tables]
    delta = torch.cat([n.reshape(-1) for n in noise]).double()
    dirs = torch.cat([delta[:, None], torch.randn(delta.numel(), 15, generator=gen).double()], 1)
    dirs = dirs / dirs.norm(dim=0)  # [D, 16] unit columns; column 0 is δ/|δ|

    grads, losses = _batch_grads(TwistedLM(base, TrainableTable(tables)), task, name, 48, 16, 0)
    mean, se = _mean_and_stderr(grads @ dirs)
    # k = 5 standard errors; + 1e-6 absorbs float round-off where the gradient is exactly 0.
    assert (mean.abs() <= 5 * se + 1e-6).all(), (mean, se)
    if name in ("ctl", "rl"):
        mean_e, se_e = _mean_and_stderr(grads)
        assert (mean_e.abs() <= 5 * se_e + 1e-6).all()
        assert max(abs(x) for x in losses) < 1e-6  # CTL: pos = neg; RL: targets = values

    # Control: at ψ* + δ the gradient along δ is clearly non-zero, so the check above can fail.
    pert = TwistedLM(base, TrainableTable([t + n for t, n in zip(tables, noise)]))
    grads_p, _ = _batch_grads(pert, task, name, 48, 16, 0)
    mean_p, se_p = _mean_and_stderr(grads_p @ dirs[:, :1])
    print(
        f"{name}: along delta at psi* {float(mean[0]):.2e} (se {float(se[0]):.1e}), "
        f"perturbed {float(mean_p[0]):.2e} (se {float(se_p[0]):.1e})"
    )
    assert mean_p[0] > 5 * se_p[0] + 1e-6  # descent (−∇) points back toward ψ*


# -- learning -------------------------------------------------------------------------------------

# Adam on an MLP head (seed 0): (lr, K particles, updates, required KL(σ‖q) final/initial ratio).
# KL(σ‖q) starts at 3.55 (q = p₀). Final ratios seen, seeds 0–4 (seed 0 is the test):
#   ctl   0.057 0.108 0.108 0.077 0.107   exact positives (seed 0): 0.064, csmc: 0.088
#   rl    0.265 0.265 0.283 0.281 0.272                             0.170
#   sixo  0.184 0.190 0.177 0.177 0.218                             0.069
#   fudge 0.089 0.085 0.091 0.135 0.107
#   dpg   0.128 0.115 0.109 0.106 0.125                             0.050
LEARNING = {
    "ctl": (3e-3, 32, 100, 0.5),
    "rl": (1e-3, 32, 150, 0.5),
    "sixo": (1e-3, 32, 150, 0.5),
    "fudge": (1e-3, 32, 100, 0.75),
    "dpg": (1e-3, 32, 100, 0.5),
}
CASES = [(name, None) for name in ALL] + [(name, "exact") for name in WITH_EXACT]
CASES.append(("ctl", "csmc"))  # cSMC positives around one pinned exact sample (infilling CTL)


@pytest.mark.parametrize(("name", "positives"), CASES)
def test_learning_reduces_kl(world, name, positives):
    base, task, sol, pool = world
    lr, k, updates, ratio = LEARNING[name]
    model = head_model(base, name, seed=0)
    method = build_method(name) if positives is None else build_method(name, positives=positives)
    batch = TrainContext(model, task, k, torch.Generator().manual_seed(0), exact_pool=pool)
    opt = torch.optim.Adam(model.twist.parameters(), lr=lr)
    kl0 = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    for _ in range(updates):
        loss, _ = method.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    kl1 = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    print(
        f"{name} ({positives or 'default'}): KL(sigma||q) {kl0:.3f} -> {kl1:.3f} "
        f"(ratio {kl1 / kl0:.3f})"
    )
    assert kl1 <= ratio * kl0


def test_pinned_sampling_keeps_each_groups_exact_sample_in_its_first_slot(world):
    """TrainContext.sample(pinned=…) runs one conditional SMC per o group, each carrying its
    group's exact sample in the group's first row (what CTL's csmc positives rely on)."""
    base, task, _, pool = world
    model = TwistedLM(base)  # q = p₀ (the toy head twist takes no o)
    g, size = 4, 8
    cond = torch.arange(g).repeat_interleave(size)[:, None]  # a stand-in o per group
    batch = TrainContext(
        model, task, g * size, torch.Generator().manual_seed(0), cond=cond, group_size=size
    )
    pins = pool[:g]
    res = batch.sample(ess_threshold=1.0, pinned=pins)
    assert torch.equal(res.tokens[::size], pins)
    w = batch.normalize(res.log_w)
    assert torch.allclose(w.view(g, size).sum(1), torch.full((g,), 1.0 / g), atol=1e-6)
    with pytest.raises(ValueError, match="pinned has 1 rows for 4 SMC runs"):
        batch.sample(ess_threshold=1.0, pinned=pins[:1])
