"""PPO (smclm.methods.ppo; baselines-spec A7.6) on the enumerable toy world.

The toy problem: the toy world (V = 12), prompt "the cat", T = 3 (1728 sequences), the threshold
potential φ = 1["bad" appears] + ε with ε = 1e-3 — the task of experiment=toy_ppo.

Exact identities first (ratio ≡ 1 on the first minibatch, GAE with λ = 1 and V ≡ 0 is the
reward-to-go, β·Σ_t r_t is the SIS log-weight, zero expected policy gradient at q = σ), then
learning (exact KL(q‖σ) halves), then the skip, the fidelity flags, bad input and the trainer.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import load_file
from torch import nn

from smclm.build import METHOD_WORLD_KEYS
from smclm.errors import ConfigError, UserError
from smclm.evaluators.exact import exact_metrics, solve
from smclm.methods import build_method
from smclm.methods.base import TrainContext
from smclm.methods.ppo import PPO, gae, ppo_loss, token_rewards, whiten
from smclm.models.policy import POLICIES, build_policy
from smclm.models.twist import TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.base import Task
from smclm.tasks.toy import build_toy_task
from smclm.train import train

T, BAD, EPS, C = 3, 9, 1e-3, 2


@pytest.fixture(scope="module")
def task(toy_world):
    _, tok = toy_world
    prompt = torch.tensor(tok("the cat", add_special_tokens=False)["input_ids"])
    return build_toy_task(prompt, T, "threshold", [BAD], 12, min_count=1, epsilon=EPS)


def make(toy_world, task, kind="mlp_head", n=32, seed=0, lr=3e-3, **options):
    """A PPO learner set up on a fresh policy of ``kind`` (conditioning tokens for
    separate_conditional: one random o per row, which the toy potential ignores)."""
    base = toy_world[0]
    torch.manual_seed(seed)
    conditional = kind == "separate_conditional"
    policy = build_policy(kind, base, conditional=conditional)
    model = TwistedLM(base, None, policy)
    batch = TrainContext(model, task, n, torch.Generator().manual_seed(seed))
    if conditional:
        batch.cond = torch.randint(0, 12, (n, C), generator=torch.Generator().manual_seed(99))
    ppo = PPO(**options)
    ppo.setup(batch, lr)
    return ppo, batch


def params(ppo: PPO, batch: TrainContext) -> list[torch.Tensor]:
    mods = [batch.model.policy, ppo.value_head]
    return [p.detach().clone() for m in mods for p in m.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- exact identities ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", POLICIES)
def test_first_minibatch_of_each_update_has_ratio_one(toy_world, task, kind):
    ppo, batch = make(toy_world, task, kind, mini_batch_size=8)  # 4 minibatches × 4 epochs
    for _ in range(3):
        ppo.update(batch)
        first, rest = ppo.last_minibatches[0], ppo.last_minibatches[1:]
        assert len(ppo.last_minibatches) == 16
        assert first["ratio_max_dev"] <= 1e-6
        assert max(s["ratio_max_dev"] for s in rest) > 1e-4  # the steps did move the policy


def test_gae_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    gamma, lam = 0.9, 0.8
    v_next = torch.cat([v[:, 1:], torch.zeros(5, 1)], dim=1)  # V_{T+1} = 0
    delta = r + gamma * v_next - v
    want = torch.stack(
        [sum((gamma * lam) ** (k - t) * delta[:, k] for k in range(t, 6)) for t in range(6)], 1
    )
    torch.testing.assert_close(gae(r, v, gamma, lam), want)
    reward_to_go = r.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(gae(r, torch.zeros_like(r), 1.0, 1.0), reward_to_go)
    w = whiten(r)
    torch.testing.assert_close(w.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.std(unbiased=True), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_lambda_one_and_zero_values_give_the_reward_to_go(toy_world, task):
    ppo, batch = make(
        toy_world, task, lam=1.0, whiten_advantages=False, value_head={"init": "zeros"}
    )
    ro = ppo.rollout(batch)
    assert torch.equal(ro.values, torch.zeros_like(ro.values))
    torch.testing.assert_close(ro.advantages, ro.rewards.flip(1).cumsum(1).flip(1))
    torch.testing.assert_close(ro.adv_hat, ro.advantages)
    torch.testing.assert_close(ro.returns, ro.advantages)
    # the score sits on the last token only; the others carry −c·(log q − log p₀)
    torch.testing.assert_close(ro.rewards[:, :-1], -(ro.log_q - ro.log_p0)[:, :-1])


@pytest.mark.parametrize("kind", ["mlp_head", "full", "separate_conditional"])
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_beta_times_return_is_the_sis_log_weight(toy_world, task, kind, beta):
    task = dataclasses.replace(task, beta=beta)  # kl_coef = 1/β, R = log φ / β
    ppo, batch = make(toy_world, task, kind)
    for _ in range(3):  # move q away from p₀ so that log q ≠ log p₀
        ppo.update(batch)
    ro = ppo.rollout(batch)
    assert (ro.log_q - ro.log_p0).abs().max() > 1e-3
    # sampled log-weight (log q accumulated while sampling) vs the teacher-forced rewards
    torch.testing.assert_close(beta * ro.rewards.sum(1), ro.sample.log_w, atol=1e-5, rtol=0)
    m = ppo.update(batch)
    assert m["train/f_q"] == pytest.approx(beta * (m["ppo/reward"] - m["ppo/kl"] / beta), abs=1e-5)


class TablePolicy(TabularTwist):
    """A residual policy with trainable tables: log q_t = log_softmax(log p₀ + table_t[s_<t])."""

    residual = True
    feature_dim = 1

    def __init__(self, tables: list[torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.tables = nn.ParameterList(nn.Parameter(t.clone().float()) for t in tables)
        self.vocab_size = tables[0].shape[-1]

    def full_with_features(self, input_ids, base_hidden, start, cond):
        logits = self.full(input_ids, base_hidden, start, cond)
        return logits, torch.zeros(*logits.shape[:2], 1)


def test_expected_policy_gradient_vanishes_at_sigma(toy_world, task):
    """With λ = 1, V ≡ 0 and no whitening, the first-minibatch PPO loss over all Vᵀ sequences
    weighted by q(s) is the exact expected loss; its gradient is −∇(F_q/β)/T: zero at q = σ (the
    maximiser), not at q = p₀."""
    base = toy_world[0]
    sol = solve(TwistedLM(base), task)
    seqs, m = sol.sequences, sol.sequences.shape[0]
    grads = {}
    for name, tables in (("sigma", sol.psi_star_tables()), ("p0", None)):
        if tables is None:
            tables = [torch.zeros_like(t) for t in sol.psi_star_tables()]
        model = TwistedLM(base, None, TablePolicy(tables))
        if name == "sigma":
            assert exact_metrics(model, task, sol)["kl/q_sigma_exact"] < 1e-5  # q = σ
        batch = TrainContext(model, task, m, torch.Generator().manual_seed(0))
        ppo = PPO(lam=1.0, whiten_advantages=False, value_head={"init": "zeros"})
        ppo.setup(batch, 1e-3)
        ids = torch.cat([task.prompt_ids[None].expand(m, -1), seqs[:, :-1]], dim=1)
        with torch.no_grad():
            hidden = model.body(input_ids=ids).last_hidden_state
        log_q, values, _ = ppo._policy_pass(model, ids, hidden, seqs, None)
        with torch.no_grad():
            lp0 = model.sequence_log_probs(task.prompt_ids, seqs, proposal="p0")["log_p0"]
        rewards = token_rewards(log_q.detach(), lp0, sol.log_phi.float(), kl_coef=1.0)
        adv = gae(rewards, torch.zeros_like(rewards), 1.0, 1.0)
        q_w = log_q.detach().sum(1, keepdim=True).exp() * m  # E_q as a mean over the M rows
        loss, _ = ppo_loss(
            log_q, log_q.detach(), values, values.detach(), adv * q_w, adv, 0.2, 0.2, 0.1
        )
        g = torch.autograd.grad(loss, list(model.policy.tables))
        grads[name] = torch.cat([x.reshape(-1) for x in g]).norm()
    assert grads["p0"] > 1e-2
    assert grads["sigma"] < 1e-4 * grads["p0"], grads


# -- learning ------------------------------------------------------------------------------------


def make_cfg(*overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


# Exact KL(q‖σ) final/initial ratios seen for `smclm train experiment=toy_ppo` (seeds 0-4):
# 0.04-0.06. Required: ≤ 0.5.
def test_toy_ppo_experiment_halves_the_exact_kl(tmp_path):
    summary = train(make_cfg("experiment=toy_ppo", "train.progress=false"), tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl/q_sigma_exact"] for r in rows if "kl/q_sigma_exact" in r]
    assert summary["run/method"] == "ppo" and summary["run/updates"] == 150
    assert kls[0] == pytest.approx(summary["kl/p0_q_sigma_exact"])  # starts at q = p₀
    assert kls[-1] <= 0.5 * kls[0], (kls[0], kls[-1])


# -- the ratio skip ------------------------------------------------------------------------------


def test_skipped_minibatches_leave_parameters_bit_identical(toy_world, task):
    ppo, batch = make(toy_world, task, mini_batch_size=16)
    ppo.update(batch)  # Adam now has moments that would move the weights on a zero gradient
    before, adam = params(ppo, batch), ppo.optimizer.state_dict()
    ppo.ratio_threshold = 1e-3  # every mean ratio (≈ 1) is above it: skip every minibatch
    m = ppo.update(batch)
    assert m["ppo/skipped_minibatches"] == 8.0
    assert same(before, params(ppo, batch))
    assert adam["state"][0]["step"] == ppo.optimizer.state_dict()["state"][0]["step"]


def test_zero_loss_skip_reproduces_trl_adam_still_steps(toy_world, task):
    ppo, batch = make(toy_world, task, ratio_skip="zero_loss")
    ppo.update(batch)
    before = params(ppo, batch)
    ppo.ratio_threshold = 1e-3
    m = ppo.update(batch)
    assert m["ppo/skipped_minibatches"] == 4.0
    assert not same(before, params(ppo, batch))  # TRL 0.7's "skip" is not a no-op (A4.6)


# -- fidelity flags ------------------------------------------------------------------------------


def _run(toy_world, task, updates=2, **options):
    ppo, batch = make(toy_world, task, **options)
    ms = [ppo.update(batch) for _ in range(updates)]
    ms = [{k: v for k, v in m.items() if not k.startswith("time/")} for m in ms]
    return ms, params(ppo, batch), ppo, batch


def test_fidelity_flags_off_equal_the_default(toy_world, task):
    off = dict.fromkeys(("freeze_value_head", "reset_rng_to_zero", "sample_in_train_mode"), False)
    m_a, p_a, _, _ = _run(toy_world, task)
    m_b, p_b, _, _ = _run(toy_world, task, fidelity=off)
    assert m_a == m_b and same(p_a, p_b)


def test_freeze_value_head_only_freezes_the_value_head(toy_world, task):
    ppo, batch = make(toy_world, task, fidelity={"freeze_value_head": True})
    v0 = [p.detach().clone() for p in ppo.value_head.parameters()]
    pol0 = [p.detach().clone() for p in batch.model.policy.parameters()]
    ppo.update(batch)
    assert same(v0, [p.detach() for p in ppo.value_head.parameters()])
    assert not same(pol0, [p.detach() for p in batch.model.policy.parameters()])
    opt_ids = {id(p) for g in ppo.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in ppo.value_head.parameters())


def test_reset_rng_to_zero_makes_seeds_share_their_samples(toy_world, task):
    tokens = {}
    for flag in (False, True):
        for seed in (1, 2):
            ppo, batch = make(toy_world, task, seed=seed, fidelity={"reset_rng_to_zero": flag})
            tokens[flag, seed] = ppo.rollout(batch).sample.tokens
    assert torch.equal(tokens[True, 1], tokens[True, 2])
    assert not torch.equal(tokens[False, 1], tokens[False, 2])
    assert torch.initial_seed() == 0  # the global RNG too (TRL's set_seed(0))


@pytest.mark.parametrize("flag", [False, True])
def test_sample_in_train_mode_only_affects_sampling(toy_world, task, flag):
    ppo, batch = make(toy_world, task, fidelity={"sample_in_train_mode": flag})
    modes: list[bool] = []
    handle = batch.model.policy.head.register_forward_pre_hook(
        lambda mod, args: modes.append(batch.model.policy.training)
    )
    try:
        ppo.update(batch)
    finally:
        handle.remove()
    # T sampling steps, then the rollout's teacher-forced pass and one pass per PPO epoch
    assert modes == [flag] * T + [False] * (1 + ppo.ppo_epochs)
    assert not batch.model.policy.training and not ppo.value_head.training


# -- bad input -----------------------------------------------------------------------------------


def test_bad_options_raise_config_errors_with_the_fix(toy_world, task):
    with pytest.raises(ConfigError, match=r"mini_batch_size=12 does not divide .*=32; choose"):
        make(toy_world, task, mini_batch_size=12)
    with pytest.raises(ConfigError, match="ratio_skip=drop must be one of: skip_step, zero_loss"):
        PPO(ratio_skip="drop")
    with pytest.raises(ConfigError, match="kl_estimator=k2 must be one of: k1, k3"):
        PPO(kl_estimator="k2")
    with pytest.raises(ConfigError, match="fidelity has unknown key"):
        PPO(fidelity={"freeze_value": True})
    with pytest.raises(ConfigError, match="ppo_epochs=0 must be a positive integer"):
        PPO(ppo_epochs=0)
    with pytest.raises(ConfigError, match="does not take option.*batch_size"):
        build_method("ppo", batch_size=100)  # the batch is smc.n_particles
    batch = TrainContext(TwistedLM(toy_world[0]), task, 8, torch.Generator())
    with pytest.raises(ConfigError, match="set method.policy="):
        PPO().setup(batch, 1e-3)


def test_minus_infinite_log_phi_is_refused(toy_world, task):
    def no_floor(tokens, cond=None):  # log φ = −∞ on some rows (not all: SIS still runs)
        return torch.where(tokens[:, -1] % 2 == 0, 0.0, -math.inf)

    ppo, batch = make(toy_world, Task("toy", task.prompt_ids, T, no_floor))
    with pytest.raises(UserError, match="task.epsilon"):
        ppo.update(batch)


# -- config and trainer --------------------------------------------------------------------------


def test_method_config_keys_are_the_constructor_options():
    cfg = make_cfg("method=ppo")
    keys = {k for k in cfg.method if k not in METHOD_WORLD_KEYS}
    assert keys == set(inspect.signature(PPO).parameters)
    ppo = build_method("ppo", **{k: cfg.method[k] for k in keys})
    assert ppo.name == "ppo" and ppo.mini_batch_size is None and ppo.ppo_epochs == 4


PAPER = {  # experiment: (policy, lr, updates, schedule, the task/method experiment it mirrors)
    "ppo_toxicity_classifier": ("full", 1e-6, 2048, "exponential", "toxicity_classifier"),
    "ppo_sentiment": ("mlp_head", 1e-5, 2048, "exponential", "sentiment"),
    "ppo_infilling_15": ("separate_conditional", 3e-5, 5500, "linear", "infilling_15"),
    "ppo_infilling_2": ("separate_conditional", 3e-5, 8192, "exponential", "infilling_2"),
}


@pytest.mark.parametrize("exp", list(PAPER))
def test_paper_experiments_compose_to_the_paper_settings(exp):
    policy, lr, updates, schedule, twin = PAPER[exp]
    cfg = make_cfg(f"experiment={exp}")
    assert cfg.method.name == "ppo" and cfg.method.policy == policy
    assert cfg.optimizer.lr == lr and cfg.smc.n_particles == 100
    assert cfg.train.updates == updates and cfg.train.schedule == schedule
    build_method("ppo", **{k: v for k, v in cfg.method.items() if k not in METHOD_WORLD_KEYS})
    # the same setting as the task's own experiment run with method=ppo (per_method/<twin>/ppo)
    other = make_cfg(f"experiment={twin}", "method=ppo")
    for key in ("task", "model", "smc", "train", "exact_samples", "evaluator"):
        assert cfg[key] == other[key], key
    assert other.method.policy == policy and other.method.lr == lr


def _rows(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    drop = ("time/", "compute/update_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def test_train_logs_ppo_metrics_and_resumes_bit_identically(tmp_path):
    common = [
        "experiment=toy_ppo",
        "smc.n_particles=16",
        "method.mini_batch_size=8",
        "train.eval_every=2",
        "train.progress=false",
        "seed=3",
    ]
    train(make_cfg(*common, "train.updates=4"), tmp_path / "whole")
    train(make_cfg(*common, "train.updates=2"), tmp_path / "split")
    train(make_cfg(*common, "train.updates=4", "resume=true"), tmp_path / "split")
    rows = _rows(tmp_path / "whole")
    update_rows = [r for r in rows if "ppo/reward" in r]
    assert len(update_rows) == 4
    for key in ("ppo/kl", "ppo/clipfrac", "ppo/ratio_mean", "train/f_q", "train/loss"):
        assert key in update_rows[0], key
    assert update_rows[0]["compute/value_forward_calls"] > 0
    assert update_rows[0]["compute/potential_sequences"] == 16
    assert any(k.startswith("compute/policy_backward") for k in update_rows[0])
    ckpt = "checkpoints/step_4"
    a = load_file(str(tmp_path / "whole" / ckpt / "params.safetensors"))
    b = load_file(str(tmp_path / "split" / ckpt / "params.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "whole" / ckpt / "state.pt", weights_only=False)["optimizer"]
    sb = torch.load(tmp_path / "split" / ckpt / "state.pt", weights_only=False)["optimizer"]
    for k, v in sa["value_head"].items():
        assert torch.equal(v, sb["value_head"][k]), k
    assert rows == _rows(tmp_path / "split")
    first = load_file(str(tmp_path / "whole/checkpoints/step_2/params.safetensors"))
    assert any(not torch.equal(first[k], a[k]) for k in a)  # training changed the policy
