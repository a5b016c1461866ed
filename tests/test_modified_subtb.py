"""Modified SubTB (Hu et al.'s GFlowNet loss, baselines-spec B2) and the GFlowNet learner on
variable-length targets (README "Stopping"), against exact answers on the toy world.

The world is the one of tests/test_stopping.py: V = 12, prompt "the cat", T = 4, φ = exp(1.5·#{3,
6}), stop tokens ⊤ = {"dog", "a"} (ids 2, 5). The optimal policy is q*(v | z_<t) ∝ p₀(v | z_<t)·
ψ*_t(z_<t v) with the exact ψ* of the enumeration (smclm.evaluators.exact), as tables over
prefixes; the gradient is checked against a float64 brute force written here with plain loops.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from smclm.errors import ConfigError
from smclm.evaluators.exact import solve
from smclm.methods.base import TrainContext
from smclm.methods.gfn import GFN, UNTERMINABLE_LOG_R, subtb_loss
from smclm.methods.replay import ReplayBuffer, edit_distances
from smclm.models.policy import build_policy
from smclm.models.twist import TabularTwist
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.toy import build_toy_task
from smclm.train import train

V, T = 12, 4
PROMPT = torch.tensor([0, 1])  # "the cat"
TARGETS = [3, 6]
BETA = 1.5


def make_task(stop_ids=(2, 5), min_len=1):
    return build_toy_task(
        PROMPT, T, "exp_count", TARGETS, V, beta=BETA, stop_ids=stop_ids, min_len=min_len
    )


class TablePolicy(TabularTwist):
    """A policy whose logits are trainable tables over prefixes, residual on p₀:
    q(v | z_<t) ∝ p₀(v | z_<t)·exp(table_t[z_<t, v])."""

    residual = True

    def __init__(self, tables: list[torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.tables = nn.ParameterList(nn.Parameter(t.clone().float()) for t in tables)
        self.vocab_size = tables[0].shape[-1]


def loss_of(model, task, tokens, tau_r=1.0):
    """(loss, log F_0) of GFN(loss=modified_subtb) on given finished sequences."""
    batch = TrainContext(model, task, tokens.shape[0], torch.Generator().manual_seed(0))
    method = GFN(loss="modified_subtb", p_on_policy=1.0, p_replay=0.0, p_tempered=0.0)
    method.setup(batch, lr=1e-3)
    assert method.loss_kind == "modified_subtb" and method.log_z is None
    loss, log_f0, _ = method.batch_loss(batch, tokens, torch.zeros(tokens.shape[0]), tau_r)
    return loss, log_f0


@pytest.mark.parametrize("stop_ids,min_len", [((2, 5), 1), ((5,), 2)])
def test_loss_and_gradient_vanish_at_the_optimal_policy(toy_world, stop_ids, min_len):
    """q* = p₀ψ*_t/ψ*_t−1 over every finished sequence of the world: the loss is 0 to float
    tolerance, and so is its gradient. With min_len 2 the empty prefix may not stop: it has
    log R = −99 (Hu's, kept in the pairs), and its flow −99 − log q(⊤ | ∅) uses the unmasked
    policy's stop probability, which the sampler never draws; at the optimum that probability is
    e^−99/Z (the stop entry of the first table is set so), and log F_0 = log Z."""
    base, _ = toy_world
    task = make_task(stop_ids, min_len)
    sol = solve(TwistedLM(base), task)
    tables = [t.clone() for t in sol.psi_star_tables()]
    if min_len == 2:  # log q(⊤ | ∅) = −99 − log Z, with the non-stops' masked split unchanged
        log_p0 = torch.log_softmax(base(input_ids=PROMPT[None]).logits[0, -1].double(), -1)
        a = torch.logsumexp(log_p0[[v for v in range(V) if v not in stop_ids]] + tables[0][0][
            [v for v in range(V) if v not in stop_ids]].double(), 0)  # fmt: skip
        c = UNTERMINABLE_LOG_R - sol.log_z
        x = c + a - math.log1p(-math.exp(c))
        tables[0][0, stop_ids[0]] = float(x - log_p0[stop_ids[0]])
    policy = TablePolicy(tables)
    model = TwistedLM(base, None, policy)
    loss, log_f0 = loss_of(model, task, sol.sequences)
    assert float(loss.detach()) < 1e-8, float(loss.detach())
    assert torch.allclose(log_f0, torch.full_like(log_f0, sol.log_z), atol=1e-4)
    grads = torch.autograd.grad(loss, list(policy.parameters()), allow_unused=True)
    finite = [g[torch.isfinite(g)] for g in grads if g is not None]
    assert max(float(g.abs().max()) for g in finite if g.numel()) < 1e-4
    # control: the base policy (q = p₀ masked) is not optimal
    flat = TablePolicy([torch.zeros_like(t) for t in tables])
    assert float(loss_of(TwistedLM(base, None, flat), task, sol.sequences)[0].detach()) > 0.1


def brute_force_loss(base, tables64, seqs, stop_ids, min_len, tau_r):
    """Modified SubTB (+ the stop-choice term) in float64 with plain loops over sequences,
    states and pairs, from the model's own logits; φ counted by hand."""
    stop_ids = list(stop_ids)
    acc, n_pairs, acc_choice, n_choice = 0.0, 0, 0.0, 0
    for z in seqs:
        ell = next(k for k, v in enumerate(z, 1) if v in stop_ids)
        ids = torch.tensor([PROMPT.tolist() + z])
        with torch.no_grad():
            logp0 = torch.log_softmax(base(input_ids=ids).logits[0].double(), -1)
        start = PROMPT.numel() - 1
        log_f, log_pf = [], []
        for i in range(ell):  # state z_1:i
            t = i + 1  # the step that follows it
            row = sum(z[k] * V ** (i - 1 - k) for k in range(i))
            lq = torch.log_softmax(logp0[start + i] + tables64[i][row], -1)
            if t < min_len:
                allowed = [v for v in range(V) if v not in stop_ids]
            elif t == T:
                allowed = stop_ids
            else:
                allowed = list(range(V))
            log_mass = torch.logsumexp(lq[allowed], 0)
            lp0_prefix = sum(float(logp0[start + k, z[k]]) for k in range(i))
            log_r_v = [
                (lp0_prefix + float(logp0[start + i, v]) + BETA * sum(
                    tok in TARGETS for tok in z[:i] + [v])) / tau_r
                for v in stop_ids
            ]  # fmt: skip
            if t >= min_len:
                log_r = torch.logsumexp(torch.tensor(log_r_v, dtype=torch.float64), 0)
                log_pterm = torch.logsumexp(lq[stop_ids], 0) - log_mass
                lq_stop = lq[stop_ids] - torch.logsumexp(lq[stop_ids], 0)
                lr_stop = torch.tensor(log_r_v, dtype=torch.float64) - log_r
                for a, b in zip(lq_stop, lr_stop):
                    acc_choice = acc_choice + (a - b) ** 2
                    n_choice += 1
            else:
                log_r = torch.tensor(UNTERMINABLE_LOG_R / tau_r, dtype=torch.float64)
                log_pterm = torch.logsumexp(lq[stop_ids], 0)  # unmasked
            log_f.append(log_r - log_pterm)
            if i < ell - 1:
                log_pf.append(lq[z[i]] - log_mass)
        for i in range(ell):
            for j in range(i + 1, ell):
                res = log_f[i] + sum(log_pf[i:j]) - log_f[j]
                acc = acc + res**2
                n_pairs += 1
    loss = acc / n_pairs
    if len(stop_ids) > 1:
        loss = loss + acc_choice / n_choice
    return loss


@pytest.mark.parametrize("stop_ids,min_len", [((2, 5), 2), ((5,), 1)])
def test_gradient_matches_a_float64_brute_force(toy_world, stop_ids, min_len):
    """At a random (non-optimal) table policy and τ_R = 0.8, on 40 sampled finished sequences
    of every length: the loss and its gradient with respect to the policy's logits (the tables)
    match the brute force (relative 1e-4 of the largest gradient entry)."""
    base, _ = toy_world
    task = make_task(stop_ids, min_len)
    gen = torch.Generator().manual_seed(0)
    tables = [0.7 * torch.randn(V ** (t - 1), V, generator=gen) for t in range(1, T + 1)]
    policy = TablePolicy(tables)
    model = TwistedLM(base, None, policy)
    with torch.no_grad():
        res = TrainContext(model, task, 40, gen).sample(ess_threshold=0.0)
    seqs = res.tokens
    assert len(set(res.lengths.tolist())) >= 3
    loss, _ = loss_of(model, task, seqs, tau_r=0.8)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    tables64 = [t.double().requires_grad_(True) for t in tables]
    z = [row[: int(ell)] for row, ell in zip(seqs.tolist(), res.lengths.tolist())]
    expect = brute_force_loss(base, tables64, z, stop_ids, min_len, 0.8)
    expect_grads = torch.autograd.grad(expect, tables64)
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-4)
    scale = max(float(g.abs().max()) for g in expect_grads)
    assert scale > 1e-3
    for got, want in zip(grads, expect_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4 * scale, rtol=1e-3)


def test_tb_on_a_stopping_task_uses_the_finished_sequence(toy_world):
    """TB with stopping: log q is the sampler's (masked proposal, summed up to and including the
    stop, nothing after it), and at q* with log Z_θ = log Z the loss is 0."""
    base, _ = toy_world
    task = make_task(min_len=2)
    sol = solve(TwistedLM(base), task)
    torch.manual_seed(0)
    model = TwistedLM(base, None, build_policy("mlp_head", base))
    nn.init.normal_(model.policy.head.net[-1].weight, std=0.3)
    batch = TrainContext(model, task, 64, torch.Generator().manual_seed(1))
    method = GFN(loss="tb", pilot_samples=0)
    method.setup(batch, lr=1e-3)
    with torch.no_grad():
        res = batch.sample(ess_threshold=0.0)
    _, _, log_q = method.batch_loss(batch, res.tokens, res.log_p0 + res.log_phi, 1.0)
    torch.testing.assert_close(log_q.detach(), res.log_q, atol=1e-4, rtol=0)
    opt = TwistedLM(base, None, TablePolicy(sol.psi_star_tables()))
    batch = TrainContext(opt, task, 64, torch.Generator().manual_seed(1))
    method = GFN(loss="tb", pilot_samples=0)
    method.setup(batch, lr=1e-3)
    with torch.no_grad():
        method.log_z.a.fill_(sol.log_z)
        res = batch.sample(ess_threshold=0.0)
    loss, _, _ = method.batch_loss(batch, res.tokens, res.log_p0 + res.log_phi, 1.0)
    assert float(loss.detach()) < 1e-8


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_subtb_with_lengths_is_each_trajectory_cut_at_its_stop(lam):
    """SubTB (learned flow) on a stopping task: row n's loss is the fixed-length loss of its
    first ℓ_n residuals, whatever follows them (here NaN-free garbage), averaged over rows."""
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(5, 6, generator=gen)
    lengths = torch.tensor([1, 3, 6, 2, 4])
    garbage = d.clone()
    garbage[torch.arange(6)[None] >= lengths[:, None]] = 1e3
    want = sum(subtb_loss(d[n : n + 1, : int(ell)], lam) for n, ell in enumerate(lengths)) / 5
    torch.testing.assert_close(subtb_loss(garbage, lam, lengths), want)


def test_the_loss_defaults_from_the_task(toy_world):
    """method.loss=auto (configs/method/gfn.yaml): modified SubTB when the task stops, TB on a
    fixed-length task; modified SubTB on a fixed-length task and a log Z kind with it are
    refused with the fix."""
    base, _ = toy_world
    model = TwistedLM(base, None, build_policy("mlp_head", base))

    def set_up(task, **kw):
        method = GFN(**kw)
        method.setup(TrainContext(model, task, 8, torch.Generator().manual_seed(0)), 1e-3)
        return method

    fixed = build_toy_task(PROMPT, T, "exp_count", TARGETS, V, beta=BETA)
    assert GFN().loss_kind == "tb"
    assert set_up(make_task()).loss_kind == "modified_subtb"
    assert set_up(fixed).loss_kind == "tb"
    assert set_up(make_task(), loss="tb").loss_kind == "tb"
    with pytest.raises(ConfigError, match="needs a task that stops"):
        set_up(fixed, loss="modified_subtb")
    with pytest.raises(ConfigError, match="method.log_z=scalar"):
        GFN(loss="modified_subtb", log_z="batch_mean")
    with pytest.raises(ConfigError, match="method.loss=tb"):
        set_up(make_task(), log_z="batch_mean")


def test_replay_stores_variable_length_sequences_with_their_lengths():
    """A stopping task's buffer holds each z_1:ℓ without padding (de-duplication on the
    sequences themselves, Hu's tolerance on their own lengths) and pads what it replays."""
    buf = ReplayBuffer(capacity=4, sim_tolerance=0.25)
    pad = 5
    tokens = torch.tensor([[3, 5, 5, 5], [3, 4, 6, 5], [7, 7, 8, 2], [3, 4, 6, 2]])
    lengths = torch.tensor([2, 4, 4, 4])
    buf.add_batch([()] * 4, tokens, torch.tensor([0.0, 1.0, 2.0, 0.5]), lengths)
    # (3, 4, 6, 2) is within distance 1 < 0.25·8 of (3, 4, 6, 5) with a lower reward: skipped
    assert sorted(s for _, s in buf.entries()) == [(3, 4, 6, 5), (3, 5), (7, 7, 8, 2)]
    # (3, 4) is at distance 1 from (3, 5), not below 0.25·(2 + 2) = 1: not near, so it is kept
    assert buf.add((), [3, 4], 3.0)
    drawn, log_r = buf.sample((), 64, torch.Generator().manual_seed(0), width=4, pad_id=pad)
    assert drawn.shape == (64, 4)
    stored = {s: r for r, s in buf.entries()}
    for row, r in zip(drawn.tolist(), log_r.tolist()):
        key = next(s for s in stored if list(s) + [pad] * (4 - len(s)) == row)
        assert stored[key] == r
    # edit distances to rows of several lengths read each row's own column
    others = torch.tensor([[3, 4, -1, -1], [3, 4, 6, 5], [9, -1, -1, -1]]).numpy()
    got = edit_distances(torch.tensor([3, 4, 6]).numpy(), others, torch.tensor([2, 4, 1]).numpy())
    assert got.tolist() == [1, 1, 3]


def make_cfg(*overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_toy_gfn_with_stopping_halves_the_exact_kl(tmp_path):
    """`smclm train experiment=toy_gfn` with stop tokens (the toy defaults: 200 updates of 32,
    on-policy/replay/tempered mixture) trains with modified SubTB by default. Seen (seed 0):
    exact KL(σ‖q) of the policy over finished sequences 3.25 → 0.10 (ratio 0.03). Required:
    ≤ 0.5."""
    cfg = make_cfg(
        "experiment=toy_gfn", "task.stop=[dog,a]", "task.output_len=4", "train.progress=false"
    )
    summary = train(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kls = [r["kl/sigma_q_exact"] for r in rows if "kl/sigma_q_exact" in r]
    updates = [r for r in rows if "gfn/loss" in r]
    assert summary["run/method"] == "gfn" and summary["run/updates"] == 200
    assert all("gfn/log_f0" in r and "gfn/log_z_param" not in r for r in updates)
    assert {r["gfn/behaviour"] for r in updates} == {0.0, 1.0, 2.0}
    assert kls[-1] <= 0.5 * kls[0], (kls[0], kls[-1])


def test_resume_with_stopping_is_the_uninterrupted_run(tmp_path):
    """2 updates, then 2 more from the checkpoint (optimiser and a buffer of variable-length
    sequences in the learner's state) = 4 straight, on a stopping task with modified SubTB."""
    from safetensors.torch import load_file

    common = ["experiment=toy_gfn", "task.stop=[dog,a]", "task.output_len=4",
              "train.progress=false", "train.eval_every=2", "seed=1"]  # fmt: skip

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [
            {k: v for k, v in json.loads(x).items() if not k.startswith(("time/", "compute/"))}
            for x in lines
        ]

    train(make_cfg(*common, "train.updates=4"), tmp_path / "whole")
    train(make_cfg(*common, "train.updates=2"), tmp_path / "split")
    train(make_cfg(*common, "train.updates=4", "resume=true"), tmp_path / "split")
    whole = load_file(str(tmp_path / "whole/checkpoints/step_4/params.safetensors"))
    split = load_file(str(tmp_path / "split/checkpoints/step_4/params.safetensors"))
    assert whole and all(torch.equal(whole[k], split[k]) for k in whole)
    assert rows(tmp_path / "whole") == rows(tmp_path / "split")
    assert any(r.get("gfn/buffer_size", 0) > 0 for r in rows(tmp_path / "whole"))
