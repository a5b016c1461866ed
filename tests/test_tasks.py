"""The paper's tasks: potentials compute their formulas, infilling's joint sampling and per-o
bounds, every task × method on tiny real-architecture models, and clear load errors."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import build_classifier_tokenizer
from hydra import compose, initialize_config_module
from torch import nn

from smclm.errors import ConfigError, UserError
from smclm.evaluators.bounds import evaluate_bounds
from smclm.evaluators.exact import solve
from smclm.models.loading import ModelLoadError
from smclm.models.toy import build_toy_tokenizer
from smclm.models.twisted_lm import TwistedLM, hidden_dim, output_logits, token_log_probs
from smclm.tasks.base import Task
from smclm.tasks.classifier import TextClassifier
from smclm.tasks.infilling import InfillingPotential
from smclm.tasks.sentiment import SentimentPotential
from smclm.tasks.toxicity import ToxicityPotential

TWIST_METHODS = ["ctl", "rl", "sixo", "fudge", "dpg"]
POLICY_METHODS = ["ppo", "gfn"]


class StubClassifier(nn.Module):
    """Logits that are a known function of the words the classifier sees: for each class j,
    the count of classifier token id ``ids[j]`` in the text (times ``scale``) plus ``bias``."""

    def __init__(self, ids: list[int], scale: float, bias: float) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=len(ids), max_position_embeddings=None)
        self.ids, self.scale, self.bias = ids, scale, bias
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def forward(self, input_ids, attention_mask=None, **_):
        self.seen.append(input_ids.shape[0])
        counts = torch.stack([(input_ids == i).sum(1) for i in self.ids], dim=1).float()
        return SimpleNamespace(logits=self.scale * counts + self.bias)


PROMPT = torch.tensor([0, 1])  # "the cat" in the toy LM's vocabulary


def _lm_words(tokens: torch.Tensor) -> list[list[str]]:
    """What the classifier should read: the toy LM's words, prompt included, EOS dropped."""
    tok = build_toy_tokenizer(12)
    vocab = {i: w for w, i in tok.get_vocab().items()}
    rows = torch.cat([PROMPT[None].expand(tokens.shape[0], -1), tokens], dim=1)
    return [[vocab[int(i)] for i in row if int(i) != tok.eos_token_id] for row in rows]


def _classifier(ids, scale, bias, batch_size=3):
    ctok = build_classifier_tokenizer()
    stub = StubClassifier([ctok.get_vocab()[w] for w in ids], scale, bias)
    return TextClassifier(stub, ctok, build_toy_tokenizer(12), PROMPT, batch_size=batch_size), stub


def test_toxicity_potentials_match_their_formulas():
    # r(s) = 10 − 20·#"bad": non-toxic unless "bad" appears; η = −5
    clf, stub = _classifier(["bad"], -20.0, 10.0)
    tokens = torch.randint(0, 12, (7, 4), generator=torch.Generator().manual_seed(0))
    tokens[0, 1] = 9  # make sure at least one row contains "bad" (id 9 in the LM)
    r = torch.tensor([10.0 - 20.0 * words.count("bad") for words in _lm_words(tokens)])
    thr = ToxicityPotential(clf, "threshold", threshold=-5.0, epsilon=1e-16)
    expected = torch.log((r < -5.0).float() + 1e-16)
    assert torch.allclose(thr(tokens), expected)
    assert stub.seen == [3, 3, 1]  # batched by classifier_batch_size
    cls = ToxicityPotential(clf, "class_logprob", beta=2.0)
    expected = (2.0 * torch.log(1 - torch.sigmoid(r.double()))).float()  # fp64 reference
    assert torch.allclose(cls(tokens), expected, atol=1e-5)
    assert thr.log_max() == pytest.approx(math.log1p(1e-16)) and cls.log_max() == 0.0


def test_sentiment_potential_matches_its_formula_and_checks_the_class():
    words = ["bad", "sun", "cat", "mat", "red"]
    clf, _ = _classifier(words, 1.5, 0.0)
    tokens = torch.randint(0, 12, (6, 5), generator=torch.Generator().manual_seed(1))
    counts = torch.tensor([[float(w.count(x)) for x in words] for w in _lm_words(tokens)])
    pot = SentimentPotential(clf, target_class=3, beta=0.5)
    expected = 0.5 * torch.log_softmax(1.5 * counts, dim=1)[:, 2]
    assert torch.allclose(pot(tokens), expected, atol=1e-6)
    with pytest.raises(ValueError, match="target_class=6 but the classifier has 5 classes"):
        SentimentPotential(clf, target_class=6)


def test_toxicity_refuses_a_multi_class_classifier_without_a_toxic_label():
    clf, _ = _classifier(["bad", "sun"], 1.0, 0.0)
    with pytest.raises(ValueError, match="'toxic' is not a label .* LABEL_0, LABEL_1"):
        ToxicityPotential(clf, "threshold")


def test_infilling_log_phi_is_the_teacher_forced_log_prob_of_o(toy_world):
    base, _ = toy_world
    model = TwistedLM(base)
    g = torch.Generator().manual_seed(2)
    s = torch.randint(0, 12, (5, 3), generator=g)
    o = torch.randint(0, 12, (5, 2), generator=g)
    pot = InfillingPotential(base, PROMPT, batch_size=2)
    # direct: log p₀ of the whole [s, o] continuation minus that of s alone, per token
    full = model.sequence_log_probs(PROMPT, torch.cat([s, o], dim=1))["log_p0"]
    assert torch.allclose(pot(s, o), full[:, 3:].sum(1), atol=1e-5)


@pytest.mark.parametrize("budget", [1, 12 * 2 * 3, 10**9])
def test_token_log_probs_match_log_softmax_in_any_chunking(toy_world, budget):
    base, g = toy_world[0], torch.Generator().manual_seed(4)
    h = torch.randn(7, 2, hidden_dim(base), generator=g)
    targets = torch.randint(0, 12, (7, 2), generator=g)
    with torch.no_grad():
        want = torch.log_softmax(output_logits(base, h), -1).gather(-1, targets[..., None])
        got = token_log_probs(base, h, targets, budget=budget)
    assert got.dtype == torch.float32 and torch.allclose(got, want.squeeze(-1), atol=1e-6)
    assert token_log_probs(base, h[:0], targets[:0]).shape == (0, 2)


def test_infilling_log_phi_holds_a_bounded_number_of_logits(toy_world, monkeypatch):
    """Both paths of log p₀(o | prompt, s) give the same values with the head run on chunks of
    rows: no [N, c, V] logits tensor for many particles (the bounds evaluator's K = 2048)."""
    import smclm.models.twisted_lm as tlm

    base, _ = toy_world
    model, n, t_len, c = TwistedLM(base), 9, 3, 2
    g = torch.Generator().manual_seed(5)
    s, o = torch.randint(0, 12, (n, t_len), generator=g), torch.randint(0, 12, (n, c), generator=g)
    pot = InfillingPotential(base, PROMPT)

    def context():  # the sampler's KV cache of [prompt, s_1:T−1]
        ctx, _ = model.start(PROMPT, n)
        for t in range(t_len - 1):
            model.advance(ctx, s[:, t])
        return ctx

    whole_call, whole_cache = pot(s, o), pot.from_cache(model, context(), s, o)
    assert torch.allclose(whole_cache, whole_call, atol=1e-5)
    ctx, head, rows = context(), base.get_output_embeddings(), []
    # the head sees [rows·c, d] (output_logits flattens the positions): rows per chunk
    hook = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0] // c))
    monkeypatch.setattr(tlm, "TOKEN_LOGITS_BUDGET", 2 * c * 12)  # two rows per chunk
    try:
        chunked_call, chunked_cache = pot(s, o), pot.from_cache(model, ctx, s, o)
    finally:
        hook.remove()
    assert rows == [2, 2, 2, 2, 1] * 2
    assert torch.allclose(chunked_call, whole_call, atol=1e-6)
    assert torch.allclose(chunked_cache, whole_cache, atol=1e-6)


def _infilling_task(t_len: int = 2, c: int = 1, base=None) -> Task:
    return Task("infilling", PROMPT, t_len, InfillingPotential(base, PROMPT), None, cond_len=c)


def test_joint_sampling_gives_exact_conditional_samples(toy_world):
    """Among joint (s, o) draws, s given o is distributed as σ(s | o) = p₀(s)p₀(o|s)/Z(o)."""
    base, _ = toy_world
    model, task = TwistedLM(base), _infilling_task(2, 1, base)
    s, o = task.sample_joint(model, 20000, torch.Generator().manual_seed(3))
    o_star = int(torch.mode(o[:, 0]).values)
    rows = s[o[:, 0] == o_star]
    sol = solve(model, task, cond=torch.tensor([[o_star]]))
    sigma = sol.log_sigma.exp()
    n = rows.shape[0]
    counts = torch.bincount(rows[:, 0] * 12 + rows[:, 1], minlength=144).double()
    se = (sigma * (1 - sigma) / n).sqrt()
    # every cell within 4.5 standard errors (k = 4.5 over 144 cells), plus a tiny floor
    assert ((counts / n - sigma).abs() <= 4.5 * se + 1e-3).all()


def test_conditional_twists_depend_on_o(tiny_lm_dirs):
    from smclm.models.loading import build_twist, load_base_model

    base, _ = load_base_model(tiny_lm_dirs["gpt_neo"])
    for kind in ("head", "separate"):
        twist = build_twist(kind, base, head="mlp", conditional=True)
        nn.init.normal_(twist.head.net[-1].weight, 0.0, 0.5)  # leave the zero start
        model = TwistedLM(base, twist)
        o1, o2 = torch.tensor([[3, 4]]).expand(2, -1), torch.tensor([[5, 9]]).expand(2, -1)
        _, d1 = model.start(PROMPT, 2, o1)
        _, d2 = model.start(PROMPT, 2, o2)
        assert not torch.allclose(d1.log_psi, d2.log_psi)
        # teacher-forced ψ agrees with the incremental one for the same o
        tokens = torch.tensor([[2, 3], [4, 5]])
        _, full = model.forward_full(PROMPT, tokens, o1)
        assert torch.allclose(full[:, 0], d1.log_psi, atol=1e-5)


def test_bounds_sandwich_log_z_of_o(toy_world):
    """Per-o SIS/SMC bounds on a toy infilling problem bracket the enumerated log Z(o)."""
    from smclm.models.loading import build_twist

    base, _ = toy_world
    torch.manual_seed(0)
    twist = build_twist("head", base, head="mlp", conditional=True)
    nn.init.normal_(twist.head.net[-1].weight, 0.0, 0.3)  # an imperfect, non-trivial twist
    model, task = TwistedLM(base, twist), _infilling_task(2, 1, base)
    g = torch.Generator().manual_seed(4)
    s, o = task.sample_joint(model, 64, g)
    o_i = o[:1]
    rows = s[(o[:, 0] == o_i[0, 0])]
    log_z = solve(model, task, cond=o_i).log_z
    m = evaluate_bounds(
        model, task, rows, particles=[8], n_exact=rows.shape[0], generator=g, cond=o_i
    )
    k = 4  # standard errors
    for b in ("sis", "smc"):
        lo, up = m[f"bounds/log_z_lower_{b}"], m[f"bounds/log_z_upper_{b}"]
        lo_se = m[f"bounds/log_z_lower_{b}_se"] if rows.shape[0] > 1 else 0.0
        up_se = m[f"bounds/log_z_upper_{b}_se"] if rows.shape[0] > 1 else 0.0
        assert lo <= log_z + k * lo_se + 1e-6, (b, lo, log_z)
        assert up >= log_z - k * up_se - 1e-6, (b, up, log_z)


# -- every task × method on tiny real-architecture models ---------------------------------------

SETTINGS = {  # experiment, LM architecture, classifier, extra overrides
    "toxicity_threshold": ("gpt_neo", "toxicity", ["task.threshold=100.0"]),  # always accepted
    "toxicity_classifier": ("gpt_neo", "toxicity", []),
    "sentiment": ("gpt2", "sentiment", ["task.target_class=2"]),
    "infilling_15": ("gpt_neo", None, ["task.cond_len=2"]),
    "infilling_2": ("gpt2", None, ["++method.particles_per_cond=4"]),  # CTL's 10 ∤ 8
}


def _compose(overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def _overrides(exp, method, tiny_lm_dirs, tiny_classifier_dirs, tmp_path):
    arch, clf, extra = SETTINGS[exp]
    ov = [
        f"experiment={exp}",
        f"method={method}",
        f"model.name={tiny_lm_dirs[arch]}",
        "task.prompt=the cat",
        "task.output_len=3",
        "smc.n_particles=8",
        "train.updates=2",
        "train.progress=false",
        "evaluator=bounds",
        "evaluator.particles=[4]",
        "evaluator.n_exact=2",
        "exact_samples.n=8",
        f"exact_samples.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]
    if clf:
        ov.append(f"task.classifier={tiny_classifier_dirs[clf]}")
    if method == "gfn":
        ov.append("method.pilot_samples=8")
    return ov


@pytest.mark.parametrize("method", TWIST_METHODS + POLICY_METHODS)
@pytest.mark.parametrize("exp", list(SETTINGS))
def test_every_task_and_method_runs_end_to_end(
    exp, method, tiny_lm_dirs, tiny_classifier_dirs, tmp_path
):
    from smclm.train import train

    cfg = _compose(_overrides(exp, method, tiny_lm_dirs, tiny_classifier_dirs, tmp_path))
    summary = train(cfg, tmp_path / "run")
    assert summary["run/updates"] == 2
    for key in ("bounds/log_z_lower_sis", "bounds/f_q", "bounds/g_q", "kl/sigma_q"):
        assert math.isfinite(summary[key]), key
    assert summary["compute/total_sampled_tokens"] > 0
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "params.safetensors").is_file()


# -- bad input ------------------------------------------------------------------------------------


def test_load_errors_are_one_clear_line(tiny_lm_dirs, tiny_classifier_dirs, tmp_path):
    from smclm.build import build_world

    def world(*extra):
        ov = ["task=sentiment", "task.prompt=the cat", f"model.name={tiny_lm_dirs['gpt2']}"]
        return build_world(_compose([*ov, *extra]))

    with pytest.raises(ModelLoadError, match="could not load task.classifier=nobody/no-such"):
        world("task.classifier=nobody/no-such-classifier")
    with pytest.raises(ModelLoadError, match="is a GPTNeoForCausalLM, not a sequence classifier"):
        world(f"task.classifier={tiny_lm_dirs['gpt_neo']}")
    with pytest.raises(ModelLoadError, match="is a BertForSequenceClassification, not a causal"):
        world(
            f"model.name={tiny_classifier_dirs['sentiment']}",
            f"task.classifier={tiny_classifier_dirs['sentiment']}",
        )
    with pytest.raises(ConfigError, match="task.target_class=7 but the classifier has 5"):
        world(f"task.classifier={tiny_classifier_dirs['sentiment']}", "task.target_class=7")
    with pytest.raises(ConfigError, match="target_label='toxic' is not a label"):
        world("task=toxicity", f"task.classifier={tiny_classifier_dirs['sentiment']}")
    with pytest.raises(UserError, match="no such directory"):
        world(f"task.classifier={tmp_path / 'missing'}")


def test_particles_per_cond_must_divide_the_batch(tiny_lm_dirs, tmp_path):
    from smclm.train import train

    cfg = _compose(
        [
            "experiment=infilling_2",
            f"model.name={tiny_lm_dirs['gpt2']}",
            "task.prompt=the cat",
            "smc.n_particles=8",
        ]
    )
    with pytest.raises(ConfigError, match="particles_per_cond=10 must divide smc.n_particles=8"):
        train(cfg, tmp_path / "run")


@pytest.mark.parametrize("arch", ["toy", "gpt_neo", "gpt2"])
def test_infilling_potential_from_the_kv_cache_equals_the_teacher_forced_one(
    arch, toy_world, tiny_lm_dirs
):
    """The sampler scores infilling's log p₀(o | prompt, s) from its KV cache at the last step
    (with resampling on the way); it must equal a fresh teacher-forced pass."""
    from smclm.models.loading import load_base_model
    from smclm.smc.sampler import run_smc

    base = toy_world[0] if arch == "toy" else load_base_model(tiny_lm_dirs[arch])[0]
    model, task = TwistedLM(base), _infilling_task(3, 2, base)
    g = torch.Generator().manual_seed(5)
    o = torch.randint(0, 12, (16, 2), generator=g)
    res = run_smc(model, PROMPT, 3, task.bind(o), 16, ess_threshold=1.0, cond=o, generator=g)
    # without resampling at T the rows keep their o; after earlier resamples they still do
    direct = task.potential(res.tokens, o)
    assert torch.allclose(res.log_phi, direct, atol=1e-5)
