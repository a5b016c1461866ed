"""task=latent (issue 24; Hu et al. §4.2-4.4): rows (x, y[, z]) from JSONL, Z stopped at EOS,
log R(Z) = log p̃₀(Z' | C, X) + log p₀(Y | C, X, Z'), σ ∝ R^{1/τ}.

On the toy world (V = 12, EOS = "end"): the potential against a direct computation with the
model's own forward (so a wrong position, a missing bias or the stop scored twice would show),
rebinding to another row, one-line refusals of bad data, a CLI run, and CTL and GFlowNet each
cutting the exact KL(σ‖q) of a latent toy world to at most half.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_smclm, run_updates, save_tiny_bert_encoder
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.errors import ConfigError
from smclm.evaluators.exact import exact_metrics, solve
from smclm.methods.base import TrainContext

ROWS = [
    {"x": "the cat", "y": "bad", "z": "sat on"},
    {"x": "the dog", "y": "mat ran"},
    {"x": "a dog", "y": "bad", "z": None},
]
EOS = 11  # "end", the toy tokenizer's EOS


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("latent") / "rows.jsonl", ROWS)


def world_for(rows_file, *extra):
    overrides = [
        "model=toy",
        "task=latent",
        f"task.data={rows_file}",
        "task.output_len=3",
        "task.min_len=1",
        "method=ctl",
        "evaluator=exact",
        "device=cpu",
        *extra,
    ]
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return build_world(compose("train", overrides=overrides))


def encode(world, text):
    return world.tokenizer(text, add_special_tokens=False)["input_ids"]


def direct_log_phi(world, z, x, y, tau=1.0, reward_prompt="", bias=None, policy_x=None):
    """log φ(z) = (1/τ)·log R − log p̃₀(z | policy prompt) from the HF model's own logits (the
    policy prompt is x unless ``policy_x`` is given)."""
    lm = world.model.base
    b = torch.zeros(lm.config.vocab_size) if bias is None else bias

    def log_probs(context, seq, biased):
        ids = torch.tensor([context + seq])
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0].float()
        out = []
        for j, tok in enumerate(seq):
            row = logits[len(context) + j - 1] + (b if biased[j] else 0.0)
            out.append(float(row.log_softmax(-1)[tok]))
        return out

    zs = z[:-1]  # the stop is dropped before Y
    ctx = encode(world, reward_prompt + x) if reward_prompt else encode(world, x)
    ans = encode(world, y)
    lr = log_probs(ctx, zs + ans, [True] * len(zs) + [False] * len(ans))
    lp = log_probs(encode(world, x if policy_x is None else policy_x), z, [True] * len(z))
    return sum(lr) / tau - sum(lp)


SEQS = [[1, 2, EOS], [EOS, EOS, EOS], [9, EOS, EOS], [3, 4, EOS]]  # finished at ℓ = 3, 1, 2, 3


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("task.tau=0.5", "task.allowed=thecatdgs", "task.penalty=-3"),
        ("task.reward_prompt='the dog sat bad '", "task.tau=2"),
    ],
    ids=["plain", "tempered+allowed", "reward_prompt"],
)
def test_the_potential_is_log_r_over_tau_minus_log_p0(rows_file, extra):
    world = world_for(rows_file, *extra)
    task = world.task
    assert task.stop_ids == (EOS,)
    tau = 0.5 if "task.tau=0.5" in extra else 2.0 if "task.tau=2" in extra else 1.0
    prompt = "the dog sat bad " if any("reward_prompt" in e for e in extra) else ""
    bias = task.logit_bias.cpu() if task.logit_bias is not None else None
    if "task.allowed=thecatdgs" in extra:  # "on", "mat", "and", "ran", "bad", "big" are out
        assert bias is not None and bias[EOS] == 0 and bias[4] == -3 and bias[0] == 0
    got = task.log_phi(torch.tensor(SEQS))
    for row, z in enumerate(SEQS):
        ell = z.index(EOS) + 1
        want = direct_log_phi(world, z[:ell], "the cat", "bad", tau, prompt, bias)
        assert abs(float(got[row]) - want) < 1e-4, (z, float(got[row]), want)


def test_a_row_drawn_for_an_update_brings_its_own_answer(rows_file):
    world = world_for(rows_file, "task.prompt_index=all")
    task = world.task
    assert len(task.train_prompts) == 3 and len(task.test_prompts) == 0
    other = task.for_prompt(task.train_prompts[1])  # "the dog" -> "mat ran"
    z = torch.tensor([[1, 2, EOS]])
    want = direct_log_phi(world, [1, 2, EOS], "the dog", "mat ran")
    assert abs(float(other.log_phi(z)[0]) - want) < 1e-4
    assert abs(float(task.log_phi(z)[0]) - want) > 1e-3  # row 0 scores another answer


def test_bad_data_is_refused_in_one_line(tmp_path, rows_file):
    dup = write_rows(
        tmp_path / "dup.jsonl", [{"x": "the cat", "y": "bad"}, {"x": "the cat", "y": "mat"}]
    )
    with pytest.raises(ConfigError, match=r"row 2: x='the cat' appears with two different answers"):
        world_for(dup)
    with pytest.raises(ConfigError, match="no such file"):
        world_for(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match=r"task.prompt_index=7 is outside the 3 train rows"):
        world_for(rows_file, "task.prompt_index=7")
    with pytest.raises(ConfigError, match="unknown field"):
        world_for(rows_file, "task.prompt_template='{question}'")
    with pytest.raises(ConfigError, match=r"row 1: the prompt .* cannot be tokenised"):
        world_for(rows_file, "task.prompt_template='zebra {x}'")
    with pytest.raises(ConfigError, match="max_train_rows=0"):
        world_for(rows_file, "task.max_train_rows=0")


def test_the_generated_arithmetic_rows_load_with_their_test_split():
    from smclm.tasks.latent import load_rows

    train = load_rows("arithmetic", "train", seed=0, test_operands=5)
    test = load_rows("arithmetic", "test", seed=0, test_operands=5)
    assert len(train) == 1050 and len(test) == 500
    assert all(r["n_operands"] == 5 for r in test)
    assert {r["x"] for r in train}.isdisjoint({r["x"] for r in test})


@pytest.mark.parametrize(("name", "updates"), [("ctl", 100), ("gfn", 200)])
def test_ctl_and_gfn_halve_the_exact_kl_on_a_latent_toy_world(rows_file, name, updates):
    """x = "the cat", y = "bad", Z of 1-3 tokens (the stop "end" counted); τ = 0.7 and a
    restricted vocabulary. Seen (seed 0): CTL 2.29 -> 0.013, GFlowNet 2.29 -> 0.001."""
    extra = ("task.tau=0.7", "task.allowed=thecatdgs", "task.penalty=-3", f"method={name}")
    world = world_for(rows_file, *extra)
    model, task, method = world.model, world.task, world.learner
    sol = solve(model, task)
    batch = TrainContext(model, task, 32, torch.Generator().manual_seed(0))
    kl0 = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    run_updates(method, batch, 3e-3, updates)
    kl1 = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    print(f"{name}: KL(sigma||q) {kl0:.3f} -> {kl1:.3f}")
    assert kl0 > 1.0 and kl1 <= 0.5 * kl0


@pytest.fixture(scope="module")
def arithmetic_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 whose byte-level tokenizer was trained on the arithmetic rows."""
    from conftest import byte_level_tokenizer, save_tiny_gpt2_with

    from smclm.tasks.latent import load_rows

    rows = load_rows("arithmetic", "train", seed=0) + load_rows("arithmetic", "test", seed=0)
    corpus = [f"{r['x']} {r['z'] or ''}. The answer is {r['y']}." for r in rows[:400]]
    return save_tiny_gpt2_with(byte_level_tokenizer(corpus, 300), tmp_path_factory.mktemp("ar"))


def test_arithmetic_accuracy_from_the_command_line(tmp_path, arithmetic_gpt2_dir):
    """evaluator=arithmetic on task=latent task.data=arithmetic: 10 samples per test row at
    temperature 0.1 from the run's sampler, majority vote, accuracy per operand count (a random
    model: the numbers are what they are; the keys, counts and range are checked), one worked
    row before each question (task.k_shot=1), which the example leaves out."""
    out = tmp_path / "run"
    res = run_smclm(
        "train",
        f"model.name={arithmetic_gpt2_dir}",
        "task=latent",
        "task.data=arithmetic",
        "task.max_train_rows=20",
        "task.max_test_rows=3",
        "task.test_operands=5",
        "task.output_len=6",
        "task.min_len=1",
        "task.prompt_index=all",
        "task.k_shot=1",
        "task.answer_template='. The answer is {y}.'",
        "task.allowed=' ,.0123456789=+-'",
        "method=ctl",
        "smc.n_particles=4",
        "evaluator=arithmetic",
        "evaluator.n_samples=3",
        "train.updates=1",
        "train.progress=false",
        "device=cpu",
        f"hydra.run.dir={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    flat = json.loads((out / "summary.json").read_text())
    assert flat.get("arith/n_5op") == 3 and flat.get("arith/n") == 3, flat
    assert 0.0 <= flat["arith/acc_5op"] <= 1.0
    assert flat["arith/sampler"] == "twisted_smc" and flat["arith/n_samples"] == 3
    # the first question and its sample, without the k-shot demonstration before it
    assert flat["arith/example"].startswith("Question:"), flat["arith/example"]
    assert flat["arith/example"].count("Question:") == 1, flat["arith/example"]


def test_gfn_seeds_its_replay_buffer_with_the_labelled_rationales(rows_file):
    """method.buffer.seed_with_task=true: row 0's z "sat on" (then the stop) enters the buffer
    under its prompt with its untempered log R = log p₀(z | x) + log φ(z)."""
    world = world_for(
        rows_file, "method=gfn", "method.buffer.enabled=true", "method.buffer.seed_with_task=true"
    )
    model, task, method = world.model, world.task, world.learner
    batch = TrainContext(model, task, 8, torch.Generator().manual_seed(0))
    method.setup(batch, 1e-3)
    entries = method.buffer.entries(())
    assert encode(world, "sat on") == [3, 4]
    z = [3, 4, EOS]  # z_template " {z}": the toy tokenizer splits on blanks
    assert [list(seq) for _, seq in entries] == [z]
    lm = world.model.base
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([[0, 1] + z[:-1]])).logits[0].log_softmax(-1)
    log_p_z = sum(float(logits[1 + j, tok]) for j, tok in enumerate(z))
    want = log_p_z + direct_log_phi(world, z, "the cat", "bad")
    assert abs(entries[0][0] - want) < 1e-4
    without = world_for(rows_file, "method=gfn", "method.buffer.enabled=false",
                        "method.buffer.seed_with_task=true")  # fmt: skip
    with pytest.raises(ConfigError, match="seed_with_task=true needs the replay buffer"):
        without.learner.setup(TrainContext(without.model, without.task, 8, torch.Generator()), 1e-3)


def test_the_label_check_penalises_rationales_after_which_p0_prefers_another_label(rows_file):
    """task.labels=[bad, mat]: log R gets −50 exactly where p₀("mat" | x, z') > p₀("bad" | x, z')
    for row 0 (y = "bad"); every 2-token z with its stop is checked, and both cases occur."""
    world = world_for(rows_file, "task.labels=[bad,mat,ran]", "task.max_train_rows=1")
    lm = world.model.base
    zs = [[a, b, EOS] for a in range(11) for b in range(11)]
    got = world.task.log_phi(torch.tensor(zs))
    flags = []
    for row, z in enumerate(zs):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([[0, 1] + z[:2]])).logits[0, -1].log_softmax(-1)
        scores = {w: float(logits[encode(world, w)[0]]) for w in ("bad", "mat", "ran")}
        wrong = max(scores["mat"], scores["ran"]) > scores["bad"]
        flags.append(wrong)
        want = direct_log_phi(world, z, "the cat", "bad") - 50.0 * wrong
        assert abs(float(got[row]) - want) < 1e-4, (z, float(got[row]), want)
    assert any(flags) and not all(flags)
    with pytest.raises(ConfigError, match=r"y='mat ran' is not one of task.labels"):
        world_for(rows_file, "task.labels=[bad,mat]")


@pytest.mark.parametrize(
    ("evaluator", "keys"),
    [
        ("overlap", ("infill/bleu4", "infill/gleu", "infill/bertscore")),
        # the same wiring as overlap (LATENT_EVALUATORS); predict() is tested below
        pytest.param("label_vote", ("label/acc",), marks=pytest.mark.slow),
    ],
)
def test_the_infilling_and_label_evaluators_from_the_command_line(tmp_path, evaluator, keys):
    """evaluator=overlap (BLEU-4, GLEU against each test row's z, and BERTScore with a tiny
    local encoder) and evaluator=label_vote (majority label after Z) on the toy world's test
    rows, through `smclm train`."""
    test_rows = [
        {"x": "the cat", "y": "bad", "z": "sat on the mat."},
        {"x": "a dog", "y": "mat", "z": "ran and sat"},
    ]
    train = write_rows(tmp_path / "train.jsonl", ROWS[:1])
    test = write_rows(tmp_path / "test.jsonl", test_rows)
    out = tmp_path / "run"
    extra = []
    if evaluator == "overlap":
        encoder = save_tiny_bert_encoder(tmp_path / "encoder")
        extra = [f"evaluator.bertscore.model={encoder}", "evaluator.bertscore.layer=2"]
    res = run_smclm(
        "train",
        *extra,
        "model=toy",
        "task=latent",
        f"task.data={train}",
        f"task.test_data={test}",
        "task.output_len=3",
        "task.min_len=1",
        "task.labels=[bad,mat]",
        "method=ctl",
        f"evaluator={evaluator}",
        "evaluator.n_samples=4",
        "train.updates=1",
        "train.progress=false",
        "device=cpu",
        f"hydra.run.dir={out}",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    flat = json.loads((out / "summary.json").read_text())
    prefix = keys[0].split("/")[0]
    for key in keys:
        assert 0.0 <= flat[key] <= 1.0, flat
    if evaluator == "overlap":
        assert flat["infill/bertscore_model"] == f"{encoder} layer 2", flat
        assert "infill/bertscore_baseline" not in flat  # not rescaled for an unknown encoder
    assert flat[f"{prefix}/sampler"] == "twisted_smc" and flat[f"{prefix}/n_samples"] == 4


def test_the_label_vote_follows_p0s_preference_after_each_sample(rows_file):
    """LabelVoteEvaluator.predict: the label whose answer p₀ scores highest after [x, z]."""
    from omegaconf import OmegaConf

    from smclm.evaluators.latent import LabelVoteEvaluator

    world = world_for(rows_file, "task.labels=[bad,mat,ran]", "task.max_train_rows=1",
                      f"task.test_data={rows_file}", "task.max_test_rows=1")  # fmt: skip
    ev = LabelVoteEvaluator(
        OmegaConf.create({"n_samples": 2}), world.model, world.tokenizer, world.task,
        smc=OmegaConf.create({"n_particles": 4, "resampling": "multinomial", "ess_threshold": 0.5}),
    )  # fmt: skip
    lm = world.model.base
    seen = set()
    for z in ([1, 2], [9, 9], [3, 4], [5, 6], [7, 8], [2, 10]):
        with torch.no_grad():
            logits = lm(input_ids=torch.tensor([[0, 1] + z])).logits[0, -1].log_softmax(-1)
        scores = {w: float(logits[encode(world, w)[0]]) for w in ("bad", "mat", "ran")}
        want = max(scores, key=scores.get)
        seen.add(want)
        assert ev.predict(world.task, z) == want
    assert len(seen) >= 2  # the check can tell labels apart


def test_k_shot_prompting_puts_worked_rows_before_the_prompt_and_keeps_the_target(rows_file):
    """task.k_shot=1: the policy prompt is row 0 worked ("the cat" " sat on" "bad", a line),
    then x; the reward's context is x alone, so log φ = log R − log p̃₀(z | k-shot prompt)."""
    world = world_for(
        rows_file, "task.k_shot=1", "task.prompt_index=1", "task.answer_template=' {y}'"
    )
    assert world.task.prompt_ids.tolist() == encode(world, "the cat sat on bad the dog")
    z = [5, 2, EOS]
    want = direct_log_phi(world, z, "the dog", "mat ran", policy_x="the cat sat on bad the dog")
    assert abs(float(world.task.log_phi(torch.tensor([z]))[0]) - want) < 1e-4
    with pytest.raises(ConfigError, match="task.k_shot=2: the training rows hold only 1 with a z"):
        world_for(rows_file, "task.k_shot=2")


@pytest.mark.parametrize("lr", [3e-3, 0.0])
def test_sft_raises_the_policys_likelihood_of_the_demonstrations(rows_file, lr):
    """method=sft: 30 updates on row 0's z raise the policy's log q(z | x) by more than 1 nat
    (seen, seed 0: -8.71 -> -0.001); at lr 0 it does not move."""
    world = world_for(rows_file, "method=sft")
    model, task, method = world.model, world.task, world.learner
    z = torch.tensor([[3, 4, EOS]])

    def log_q():  # steps 1-2: the masked proposal is q itself there (the stop is forced at T)
        with torch.no_grad():
            _, lq = model.policy_full(task.prompt_ids, z)
        return float(lq.gather(-1, z[..., None])[0, :2].sum())

    before = log_q()
    params = [p for p in model.trainables().parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr) if lr > 0 else None
    batch = TrainContext(model, task, 8, torch.Generator().manual_seed(0))
    for _ in range(30):
        loss, metrics = method.loss(batch)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = log_q()
    print(f"sft lr {lr}: log q(z|x) {before:.3f} -> {after:.3f}")
    if lr > 0:
        assert after - before > 1.0
    else:
        assert after == pytest.approx(before)
    assert metrics["sft/prompts"] == 1.0  # only row 0 has a z


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("task.tau=0.5", "task.allowed=thecatdgs", "task.penalty=-3"),
        ("task.reward_prompt='the dog sat bad '", "task.tau=2"),
        ("task.stop=[11,10]",),
        ("task.score_stop=true", "task.stop=[11,10]"),
        ("task.reward_prompt='the dog sat bad '", "task.score_stop=true", "task.stop=[11,10]"),
    ],
    ids=["plain", "tempered+allowed", "reward_prompt", "2stops", "score_stop+2stops", "all"],
)
def test_prefix_rewards_from_one_pass_equal_scoring_every_prefix(rows_file, extra, monkeypatch):
    """LatentPotential.prefix_log_phi (one pass per row, Y for every prefix against its KV cache
    under an attention mask) gives modified SubTB the log φ of every "prefix + stop" that
    scoring each one through the potential gives (1e-4), on both rows' answers (one token and
    two), in chunks of 2 rows (the cache copied between them) and of 64."""
    from smclm.methods.gfn import _prefix_log_phi
    from smclm.tasks.latent import LatentPotential

    world = world_for(rows_file, "task.output_len=4", "task.prompt_index=all", *extra)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (5, 4), generator=gen)  # no stop inside a prefix (10, 11)
    terminable = torch.rand(5, 4, generator=gen) < 0.7
    terminable[0] = True
    stops = world.task.stopping.stop_ids
    for prompt in world.task.train_prompts[:2]:  # answers "bad" and "mat ran"
        task = world.task.for_prompt(prompt)
        fast = {}
        for size in (2, 64):
            task.potential.batch_size = size
            got = task.potential.prefix_log_phi(tokens, terminable, list(stops))
            assert got is not None and got.shape == (5, 4, len(stops))
            fast[size] = got
        with monkeypatch.context() as m:
            m.setattr(LatentPotential, "prefix_log_phi", lambda *a: None)
            want = _prefix_log_phi(task, tokens, terminable, None)
        for got in fast.values():
            assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        assert (want[~terminable] == 0).all() and (want[terminable] != 0).all()
