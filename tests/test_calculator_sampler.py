"""The calculator inside the sampler (issue 24; Hu et al. §4.4): ``task.calculator=true``.

A tiny random GPT-2 whose byte-level tokenizer was trained on arithmetic text, restricted to the
arithmetic characters so that "=" tokens come often. Checked against computations that do not
use the code under test: the inserted text against Python's own arithmetic, the sampler's
log q and log p₀ against the HF model's logits summed over the policy's steps only (so counting
the tool's tokens fails), the potential's R against the HF model's forward over the whole text,
the two-term limit, the demonstrations, and modified SubTB over forced steps against the same
loss on the sequences with the forced steps removed.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.errors import ConfigError
from smclm.methods.base import TrainContext
from smclm.methods.gfn import modified_subtb_loss
from smclm.smc.sampler import run_smc, stopped_sequence_log_probs

T = 12
ANSWER = ". The answer is {y}."
ALLOWED = " 0123456789=+-"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from conftest import byte_level_tokenizer, save_tiny_gpt2_with

    from smclm.tasks.latent import load_rows

    rows = load_rows("arithmetic", "train", seed=0) + load_rows("arithmetic", "test", seed=0)
    corpus = [f"{r['x']} {r['z'] or ''}. The answer is {r['y']}." for r in rows[:400]]
    return save_tiny_gpt2_with(byte_level_tokenizer(corpus, 300), tmp_path_factory.mktemp("calc"))


def world_for(gpt2_dir, *extra, method="ctl"):
    overrides = [
        f"model.name={gpt2_dir}",
        "task=latent",
        "task.data=arithmetic",
        "task.max_train_rows=20",
        f"task.output_len={T}",
        "task.min_len=1",
        "task.calculator=true",
        f"task.allowed='{ALLOWED}'",
        f"task.answer_template='{ANSWER}'",
        f"method={method}",
        "device=cpu",
        *extra,
    ]
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return build_world(compose("train", overrides=overrides))


def two_term_value(text: str) -> int | None:
    """The value the paper's two-term calculator gives for the text before a "=", by Python's
    own eval: the span after the last "," and "." up to its first "="; more than two operands:
    the last one with its sign."""
    span = text.split(",")[-1].split(".")[-1].split("=")[0]
    operands = re.findall(r"-?[0-9]+", span)
    if len(operands) > 2:
        span = span[list(re.finditer(r"-?[0-9]+", span))[-2].end() :]
    if not re.fullmatch(r"[0-9+\- ]*[0-9][0-9+\- ]*", span) or re.search(r"\b0[0-9]", span):
        return None
    try:
        return int(eval(span))  # noqa: S307 (digits, + and - only, checked above)
    except SyntaxError:
        return None


@pytest.fixture(scope="module")
def sampled(gpt2_dir):
    world = world_for(gpt2_dir)
    res = run_smc(
        world.model,
        world.task.prompt_ids,
        T,
        world.task.bind(None),
        48,
        ess_threshold=0.0,
        proposal="p0",
        generator=torch.Generator().manual_seed(0),
    )
    return world, res


def test_the_tool_appends_the_value_after_each_equals_sign(sampled):
    world, res = sampled
    tok, tool = world.tokenizer, world.task.tool
    triggers = set(tool.trigger_ids)
    n_inserted = 0
    for row, ell in zip(res.tokens.tolist(), res.lengths.tolist()):
        i = 0
        while i < ell - 1:
            if row[i] in triggers:
                value = two_term_value(tok.decode(row[: i + 1]))
                if value is not None:
                    ins = tok(f" {value}", add_special_tokens=False)["input_ids"]
                    if i + 1 + len(ins) <= T - 1:  # it fits before the cap's stop
                        assert row[i + 1 : i + 1 + len(ins)] == ins, tok.decode(row[:ell])
                        n_inserted += 1
                        i += len(ins)
            i += 1
    assert n_inserted >= 5, "too few tool calls to test anything; raise the particles"


def test_tool_tokens_are_in_the_context_but_not_in_log_q(sampled):
    """The sampler's log q (= log p̃₀ here: the p₀ proposal) against the HF model's own logits
    with the task's bias, summed over the policy's steps only; counting the tool's tokens
    would add their (negative) log-probabilities."""
    world, res = sampled
    lm, task = world.model.base, world.task
    bias = task.logit_bias.cpu()
    forced = world.model.forced_targets(res.tokens) >= 0
    n = res.tokens.shape[0]
    prompt = task.prompt_ids.tolist()
    ours_total, counted_total = [], []
    for r in range(n):
        ell = int(res.lengths[r])
        seq = res.tokens[r, :ell].tolist()
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([prompt + seq])).logits[0].float()
        acts, cap, tool_part = 0.0, 0.0, 0.0
        for j, t in enumerate(seq):
            lp = (logits[len(prompt) + j - 1] + bias).log_softmax(-1)
            if forced[r, j]:
                tool_part += float(lp[t])
            elif j == T - 1:  # the cap: q draws only the stop (log q = 0), p₀ is unmasked
                cap = float(lp[t])
            else:
                acts += float(lp[t])
        ours_total.append((acts, acts + cap))
        counted_total.append(acts + tool_part)
    ours = torch.tensor(ours_total, dtype=torch.float64)
    counted = torch.tensor(counted_total, dtype=torch.float64)
    assert torch.allclose(res.log_q.double(), ours[:, 0], atol=1e-3)
    assert torch.allclose(res.log_p0.double(), ours[:, 1], atol=1e-3)
    ours = ours[:, 0]
    assert (counted - ours).abs().max() > 0.1  # the tool's tokens would show if counted
    # the teacher-forced pass (the learners' and evaluators') agrees step by step
    tf = stopped_sequence_log_probs(
        world.model.with_twist(None), task.prompt_ids, res.tokens, task.stopping, proposal="p0"
    )
    assert torch.allclose(tf["log_q"].sum(1), res.log_q, atol=1e-3)
    assert bool((tf["log_q"][forced] == 0).all()) and bool((tf["log_p0"][forced] == 0).all())


def test_the_potential_makes_the_target_r_to_the_one_over_tau(gpt2_dir):
    """σ̃ = p₀^tool(Z)·φ(Z) must be R(Z)^{1/τ}, with R the base LM's probability of the whole
    text, tool tokens included, then the answer (computed here from the HF model's logits)."""
    tau = 0.5
    world = world_for(gpt2_dir, f"task.tau={tau}", method="gfn")
    task, lm = world.task, world.model.base
    res = run_smc(
        world.model,
        task.prompt_ids,
        T,
        task.bind(None),
        24,
        ess_threshold=0.0,
        generator=torch.Generator().manual_seed(1),
    )
    forced = world.model.forced_targets(res.tokens) >= 0
    assert bool(forced.any())
    bias = task.logit_bias.cpu()
    ctx = task.prompt_ids.tolist()
    ans = world.tokenizer(ANSWER.format(y=_y()), add_special_tokens=False)["input_ids"]
    for r in range(res.tokens.shape[0]):
        ell = int(res.lengths[r])
        zs = res.tokens[r, : ell - 1].tolist()  # the stop is dropped before Y
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([ctx + zs + ans])).logits[0].float()
        log_r = 0.0
        for j, t in enumerate(zs + ans):
            row = logits[len(ctx) + j - 1] + (bias if j < len(zs) else 0.0)
            log_r += float(row.log_softmax(-1)[t])
        got = float(res.log_p0[r] + res.log_phi[r])
        assert math.isclose(got, log_r / tau, abs_tol=2e-3), (r, got, log_r / tau)


def _y():
    """The answer of training row 0, the task's prompt (task.prompt_index=0)."""
    from smclm.tasks.latent import load_rows

    return load_rows("arithmetic", "train", seed=0)[0]["y"]


def test_the_two_term_limit(gpt2_dir):
    """ "3 + 4 + 5 =": the paper's two-term calculator gives the last operand (5); with no limit
    the value (12). Through the task's tool, on token ids."""
    limited = world_for(gpt2_dir).task.tool
    free = world_for(gpt2_dir, "task.calculator_terms=null").task.tool
    tok = world_for(gpt2_dir).tokenizer
    pieces = [tok("3 + 4 + 5 =", add_special_tokens=False)["input_ids"]]
    for tool, value in ((limited, 5), (free, 12)):
        out = tool.complete(pieces)
        assert tok.decode(out) == f"3 + 4 + 5 = {value}"
    two = [tok("3 + 4 =", add_special_tokens=False)["input_ids"]]
    assert tok.decode(limited.complete(two)) == "3 + 4 = 7"
    with pytest.raises(ConfigError, match="calculator_terms"):
        world_for(gpt2_dir, "task.calculator_terms=1")


def test_demonstrations_are_the_policys_part_completed_by_the_tool(gpt2_dir):
    """A labelled z "6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6" becomes the policy's "6 - 0 =, ..." with
    the tool's numbers inserted: its text is the worked rationale again, and every number after
    an "=" is a forced step."""
    world = world_for(gpt2_dir, "task.output_len=40")
    task = world.task
    groups = task.potential.seed_sequences(task.output_len, task.stopping.pad_id)
    _, tokens = groups[0]
    row = tokens[0]
    ell = int(task.stopping.lengths(row[None])[0])
    text = world.tokenizer.decode(row[: ell - 1].tolist())
    assert text == " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"
    forced = (world.model.forced_targets(row[None])[0] >= 0)[: ell - 1]
    forced_text = world.tokenizer.decode(row[: ell - 1][forced].tolist())
    assert forced_text.split() == ["6", "2", "-6"]


def test_a_gfn_update_with_the_tool_has_finite_gradients(gpt2_dir):
    world = world_for(
        gpt2_dir, "method.buffer.seed_with_task=true", "task.output_len=40", method="gfn"
    )
    batch = TrainContext(world.model, world.task, 8, torch.Generator().manual_seed(0))
    method = world.learner
    method.setup(batch, 1e-3)
    tokens, log_r = method._replay(batch, method_keys(world, 8), 8, None)
    assert bool((world.model.forced_targets(tokens) >= 0).any())
    loss, _, _ = method.batch_loss(batch, tokens, log_r, 1.0)
    loss.backward()
    grads = [p.grad for p in world.model.policy.parameters() if p.grad is not None]
    assert math.isfinite(float(loss.detach())) and grads
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def method_keys(world, n):
    from smclm.methods.gfn import _keys

    return _keys(world.task, None, n)


def test_modified_subtb_over_forced_steps_is_the_loss_without_them():
    """States followed by a forced step are not states; the loss equals modified SubTB of the
    same rows with the forced steps removed (their log pf = 0, their transitions merged)."""
    g = torch.Generator().manual_seed(0)
    n, length = 3, 7
    log_r = torch.randn(n, length, generator=g)
    log_pterm = -torch.rand(n, length, generator=g)
    log_pf = -torch.rand(n, length - 1, generator=g)
    lengths = torch.tensor([7, 5, 6])
    forced_next = torch.zeros(n, length, dtype=torch.bool)
    forced_next[0, [2, 3]] = True  # z_3, z_4 of row 0 are the tool's
    forced_next[2, 1] = True
    log_pf = log_pf.masked_fill(forced_next[:, 1:], 0.0)  # forced transitions: log q = 0
    log_pterm = log_pterm.masked_fill(forced_next, -math.inf)  # no stop before a forced token
    got = modified_subtb_loss(log_r, log_pterm, log_pf, lengths, 1.0, ~forced_next)

    num, den = 0.0, 0
    for r in range(n):
        keep = [i for i in range(int(lengths[r])) if not forced_next[r, i]]
        log_f = log_r[r] - log_pterm[r]
        for a, i in enumerate(keep):
            for j in keep[a + 1 :]:
                c = log_f[i] + log_pf[r, i:j].sum() - log_f[j]
                num += float(c) ** 2
                den += 1
    assert math.isclose(float(got), num / den, rel_tol=1e-5)


def test_the_metered_potential_is_the_task_potential_for_everything_but_counting(gpt2_dir):
    """The trainer's compute meter wraps the potential; GFlowNet's buffer seeding and SFT read
    its demonstrations through the wrapper (they once found none)."""
    from smclm.compute import ComputeMeter

    world = world_for(gpt2_dir)
    task = world.task
    inner = task.potential
    meter = ComputeMeter()
    meter.watch_task(task)
    assert task.potential is not inner and task.potential.tool is inner.tool
    seeds = task.potential.seed_sequences(task.output_len, task.stopping.pad_id)
    assert seeds and len(seeds) == len(inner.seed_sequences(task.output_len, task.stopping.pad_id))
    z = seeds[0][1][:1, :T]
    meter.begin()
    task.potential(z)
    assert meter.end()["compute/potential_sequences"] == 1


@pytest.mark.parametrize("reward_prompt", ["", "1 + 2 = 3. "])
def test_prefix_rewards_with_the_tool_equal_scoring_every_prefix(
    gpt2_dir, reward_prompt, monkeypatch
):
    """With the tool, modified SubTB's prefix rewards from one pass per sampled row
    (LatentPotential.prefix_log_phi) equal the potential on each "prefix + stop" (1e-4), with
    the states as GFlowNet takes them (no prefix followed by a forced token); GPT-2's absolute
    positions, the reward prompt's second context."""
    from smclm.methods.gfn import _prefix_log_phi
    from smclm.tasks.latent import LatentPotential

    world = world_for(gpt2_dir, f"task.reward_prompt='{reward_prompt}'")
    task = world.task
    res = run_smc(world.model, task.prompt_ids, T, task.bind(None), 16, ess_threshold=0.0,
                  proposal="p0", generator=torch.Generator().manual_seed(1))  # fmt: skip
    tokens = res.tokens
    forced = task.tool.forced_targets(tokens)
    assert (forced >= 0).any()  # the tool acted
    state = torch.arange(T)[None]
    terminable = (
        (state < res.lengths[:, None]) & (forced < 0) & (state + 1 >= task.stopping.min_len)
    )
    got = task.potential.prefix_log_phi(tokens, terminable, list(task.stopping.stop_ids))
    with monkeypatch.context() as m:
        m.setattr(LatentPotential, "prefix_log_phi", lambda *a: None)
        want = _prefix_log_phi(task, tokens, terminable, None)
    assert got is not None and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("method", ["sft", pytest.param("gfn", marks=pytest.mark.slow)])
def test_training_on_every_row_with_the_tool_from_the_command_line(tmp_path, gpt2_dir, method):
    from conftest import run_smclm

    out = tmp_path / "run"
    extra = ["method.buffer.seed_with_task=true"] if method == "gfn" else []
    res = run_smclm(
        "train",
        f"model.name={gpt2_dir}",
        "task=latent",
        "task.data=arithmetic",
        "task.max_train_rows=30",
        "task.max_test_rows=2",
        "task.output_len=30",
        "task.prompt_index=all",
        "task.calculator=true",
        f"task.answer_template='{ANSWER}'",
        f"method={method}",
        *extra,
        "smc.n_particles=4",
        "evaluator=arithmetic",
        "evaluator.n_samples=2",
        "train.updates=2",
        "train.progress=false",
        "device=cpu",
        f"hydra.run.dir={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "summary.json").exists()
