"""Plugins: the two examples/ through the real CLI from outside the repository; any sequence
classifier as a potential (one logit or C classes, the class by label name); the text-scorer
potential; tasks, potentials, twists and learners named by ``_target_``; one-line errors."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_smclm, save_tiny_classifier
from hydra import compose, initialize_config_module

from smclm.errors import ConfigError
from smclm.models.toy import build_toy_tokenizer
from smclm.tasks.base import Task
from smclm.tasks.plugin import TaskEnv

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
WORDS = build_toy_tokenizer(12).get_vocab()  # word -> toy-LM token id
TINY = ["train.updates=2", "train.eval_every=1", "smc.n_particles=8", "train.progress=false"]


def ids(*rows: str) -> torch.Tensor:
    """Toy-LM token ids [N, T] of hand-written rows of words."""
    return torch.tensor([[WORDS[w] for w in row.split()] for row in rows])


def compose_train(*overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def smclm(*args, cwd, env_extra):
    return run_smclm(*args, cwd=cwd, env={"SMCLM_CONFIG_PATH": None, **env_extra})


# -- the examples, end to end through `smclm train` and `smclm eval` from outside the repo ------


def _train_and_eval(tmp_path, args, env_extra):
    work = tmp_path / "elsewhere"  # a directory unrelated to the repository
    work.mkdir()
    env_extra = {"SMCLM_CACHE": str(tmp_path / "cache"), **env_extra}
    run = work / "run"
    proc = smclm("train", *args, *TINY, f"hydra.run.dir={run}", cwd=work, env_extra=env_extra)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    proc = smclm("eval", f"run={run}", "evaluator=auto", cwd=work, env_extra=env_extra)
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((run / "eval" / "summary.json").read_text())
    for key in ("log_z/exact", "kl/q_sigma_exact", "kl/sigma_q_exact"):  # auto → exact (V^T small)
        assert math.isfinite(evaluated[key]), key
    # the evaluation reloads the trained twist: the same KL as the run's last evaluation
    assert evaluated["kl/sigma_q_exact"] == pytest.approx(summary["kl/sigma_q_exact"], rel=1e-6)
    return run, summary


def test_text_potential_example_trains_and_evaluates_from_outside_the_repo(tmp_path):
    configs = EXAMPLES / "text_potential" / "configs"
    run, summary = _train_and_eval(
        tmp_path,
        ["task=rhymes", "method=ctl", f"hydra.searchpath=[file://{configs}]"],
        {"PYTHONPATH": str(EXAMPLES / "text_potential")},
    )
    assert summary["run/task"] == "rhymes" and summary["run/updates"] == 2
    assert "rhymes.rhyme_score" in (run / "config.yaml").read_text()


def test_twist_learner_example_trains_and_evaluates_from_outside_the_repo(tmp_path):
    run, summary = _train_and_eval(
        tmp_path,
        ["method=ctl_dpg", "task.output_len=3"],
        {
            "PYTHONPATH": str(EXAMPLES / "twist_learner"),
            "SMCLM_CONFIG_PATH": str(EXAMPLES / "twist_learner" / "configs"),
        },
    )
    assert summary["run/method"] == "ctl_dpg"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/loss" in r]
    assert len(trained) == 2
    for r in trained:  # its own metrics, and the loss it says it is
        assert r["train/loss"] == pytest.approx(r["train/loss_ctl"] + 0.5 * r["train/loss_dpg"])


def test_text_potential_example_computes_its_formula(toy_world):
    """log φ = β·log((1 + #words ending in "at") / (1 + #words)) of the continuation, β = 3."""
    sys.path.insert(0, str(EXAMPLES / "text_potential"))
    try:
        cfg = compose_train(
            "task=rhymes", f"hydra.searchpath=[file://{EXAMPLES / 'text_potential' / 'configs'}]"
        )
        from smclm.build import build_task

        base, tok = toy_world
        task = build_task(cfg.task, tok, base, torch.device("cpu"))
    finally:
        sys.path.remove(str(EXAMPLES / "text_potential"))
    tokens = ids("cat sat mat", "dog on a", "the cat ran", "bad big a")
    expected = 3 * torch.log(torch.tensor([4 / 4, 1 / 4, 2 / 4, 1 / 4]))
    assert torch.allclose(task.log_phi(tokens), expected, atol=1e-6)
    assert task.log_phi_max == 0.0 and task.beta == 3.0  # scores ≤ 1 (score_max: 1.0)


# -- any sequence classifier as a potential -------------------------------------------------------


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_classifiers")
    return {
        "two": save_tiny_classifier(
            root / "two", "roberta", 2, id2label={0: "non-toxic", 1: "toxic"}
        ),
        "one": save_tiny_classifier(root / "one", "roberta", 1, seed=1),
    }


PROMPT = "the cat"
ROWS = ("sat on a", "bad bad bad", "dog ran and", "a big mat")


def _reference_logits(clf_dir: str) -> torch.Tensor:
    """The classifier's logits for the hand-written full texts (prompt + continuation), run
    directly through transformers: [N, C]."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    tok = AutoTokenizer.from_pretrained(clf_dir)
    enc = tok([f"{PROMPT} {r}" for r in ROWS], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.double()


def _env(toy_world) -> TaskEnv:
    base, tok = toy_world
    return TaskEnv(tok, base, torch.device("cpu"), ids(PROMPT)[0])


def test_toxicity_with_a_two_class_classifier_is_beta_log_p_toxic(toy_world, classifiers):
    from smclm.tasks.toxicity import toxicity_task

    logits = _reference_logits(classifiers["two"])
    log_p = torch.log_softmax(logits, dim=1)
    common = dict(name="toxicity", prompt=PROMPT, output_len=3, classifier=classifiers["two"])
    task = toxicity_task(_env(toy_world), potential="class_logprob", beta=2.0, **common)
    assert torch.allclose(task.log_phi(ids(*ROWS)).double(), 2.0 * log_p[:, 1], atol=1e-5)
    assert task.beta == 2.0 and task.log_phi_max == 0.0
    # threshold: r = log p(non-toxic) − log p(toxic), log φ = log(1[r < η] + ε); η splits the rows
    r = log_p[:, 0] - log_p[:, 1]
    eta = float(r.sort().values[1:3].mean())  # between the 2nd and 3rd smallest r
    task = toxicity_task(_env(toy_world), potential="threshold", threshold=eta, **common)
    expected = torch.log((r < eta).double() + 1e-16)
    assert torch.allclose(task.log_phi(ids(*ROWS)).double(), expected)
    assert int((r < eta).sum()) == 2


def test_toxicity_with_one_logit_is_unchanged(toy_world, classifiers):
    """The paper's classifier: one non-toxic logit r; log p(toxic) = logsigmoid(−r)."""
    from smclm.tasks.toxicity import toxicity_task

    r = _reference_logits(classifiers["one"])[:, 0]
    task = toxicity_task(
        _env(toy_world),
        name="toxicity",
        prompt=PROMPT,
        output_len=3,
        classifier=classifiers["one"],
        potential="class_logprob",
        beta=0.5,
    )
    expected = 0.5 * torch.log(1 - torch.sigmoid(r))
    assert torch.allclose(task.log_phi(ids(*ROWS)).double(), expected, atol=1e-5)


def test_sentiment_and_classifier_tasks_take_any_class_by_label(toy_world, classifiers):
    from smclm.tasks.classifier import classifier_task
    from smclm.tasks.sentiment import sentiment_task

    log_p2 = torch.log_softmax(_reference_logits(classifiers["two"]), dim=1)
    z = _reference_logits(classifiers["one"])[:, 0]
    env, tokens = _env(toy_world), ids(*ROWS)
    common = dict(prompt=PROMPT, output_len=3)
    for label, col in (("non-toxic", 0), ("TOXIC", 1)):  # exact, then case-insensitive
        task = sentiment_task(
            env, name="s", classifier=classifiers["two"], target_label=label, **common
        )
        assert torch.allclose(task.log_phi(tokens).double(), log_p2[:, col], atol=1e-5)
    # one logit z: class 1 = sigmoid(z) (named by the logit's label), class 0 = sigmoid(−z)
    task = classifier_task(
        env, name="c", classifier=classifiers["one"], target_label="LABEL_0", beta=3.0, **common
    )
    assert torch.allclose(
        task.log_phi(tokens).double(), 3.0 * torch.log(torch.sigmoid(z)), atol=1e-5
    )
    task = classifier_task(env, name="c", classifier=classifiers["one"], target_index=0, **common)
    assert torch.allclose(task.log_phi(tokens).double(), torch.log(torch.sigmoid(-z)), atol=1e-5)
    # indicator form: log(1[p(target) > η] + ε)
    task = classifier_task(
        env,
        name="c",
        classifier=classifiers["two"],
        target_label="toxic",
        form="indicator",
        threshold=0.5,
        **common,
    )
    hit = log_p2[:, 1].exp() > 0.5
    assert torch.equal(task.log_phi(tokens) > -1, hit)


def test_a_missing_label_is_one_line_listing_the_labels(classifiers):
    from smclm.build import build_world

    cfg = compose_train(
        "task=toxicity",
        "model=toy",
        "task.prompt=the cat",
        "task.output_len=3",
        f"task.classifier={classifiers['two']}",
        "task.target_label=insult",
    )
    with pytest.raises(ConfigError) as err:
        build_world(cfg)
    msg = str(err.value)
    assert "task.target_label='insult' is not a label" in msg and "non-toxic, toxic" in msg
    assert "\n" not in msg


# -- the text-scorer potential --------------------------------------------------------------------


def test_text_scorer_log_and_indicator_forms(toy_world):
    from smclm.tasks.text_scorer import text_scorer_task

    def n_chars(texts):  # a scorer that is not a model: the number of letters
        return [sum(c.isalpha() for c in t) for t in texts]

    env, tokens = _env(toy_world), ids("sat on a", "dog ran and")
    common = dict(name="chars", prompt=PROMPT, output_len=3, scorer=n_chars)
    full = text_scorer_task(env, beta=0.5, **common)  # "the cat sat on a": 12 letters
    assert torch.allclose(
        full.log_phi(tokens), torch.tensor([0.5 * math.log(12), 0.5 * math.log(15)])
    )
    assert full.log_phi_max is None  # no score_max: no bound for rejection sampling
    cont = text_scorer_task(env, text="continuation", score_max=20.0, **common)  # "sat on a": 6
    assert torch.allclose(cont.log_phi(tokens), torch.tensor([math.log(6), math.log(9)]))
    assert cont.log_phi_max == pytest.approx(math.log(20.0))
    ind = text_scorer_task(env, form="indicator", threshold=13, epsilon=1e-3, **common)
    assert torch.allclose(ind.log_phi(tokens), torch.tensor([math.log(1e-3), math.log(1 + 1e-3)]))
    assert ind.log_phi_max == pytest.approx(math.log1p(1e-3)) and ind.beta == 1.0


def test_text_scorer_refuses_bad_scores(toy_world):
    from smclm.tasks.text_scorer import text_scorer_task

    env, tokens = _env(toy_world), ids("sat on a", "dog ran end")
    common = dict(name="t", prompt=PROMPT, output_len=3)
    with pytest.raises(ValueError, match="needs scores ≥ 0"):
        text_scorer_task(env, scorer=lambda t: [-1.0] * len(t), **common).log_phi(tokens)
    with pytest.raises(ValueError, match="returned 1 numbers for 2 texts"):
        text_scorer_task(env, scorer=lambda t: [1.0], **common).log_phi(tokens)
    with pytest.raises(ValueError, match="not a callable"):
        text_scorer_task(env, scorer="rhymes", **common)


# -- _target_ for a potential, a twist and a learner; one-line errors ------------------------------


class LastTokenIs:
    """A user's potential over token ids: log φ = 0 when the last token is ``token``, else log ε."""

    def __init__(self, token: int, epsilon: float = 1e-3) -> None:
        self.token, self.epsilon = token, epsilon

    def __call__(self, tokens, cond=None):
        return torch.log((tokens[:, -1] == self.token).float() + self.epsilon)

    def log_max(self):
        return math.log1p(self.epsilon)


SEEN: dict = {}


def recording_twist(base, conditional, dtype, squash=None, **own):
    """A user's twist builder: records what smclm passes, returns a built-in head twist."""
    from smclm.models.loading import build_twist

    SEEN.update(conditional=conditional, dtype=dtype, squash=squash, own=own)
    return build_twist("head", base, head="linear", squash=squash, dtype=dtype)


def test_potential_twist_and_learner_by_target(tmp_path):
    from smclm.build import build_world
    from smclm.methods import CTL

    cfg = compose_train()
    cfg.task = {
        "_target_": "smclm.tasks.plugin.potential_task",
        "name": "last_bad",
        "prompt": "the cat",
        "output_len": 3,
        "potential": {"_target_": "test_plugins.LastTokenIs", "token": WORDS["bad"]},
    }
    cfg.twist = {"_target_": "test_plugins.recording_twist", "width": 7}
    cfg.method = {"_target_": "smclm.methods.ctl.CTL", "name": "mine", "lr": 1e-3}
    world = build_world(cfg)
    assert isinstance(world.task, Task) and world.task.name == "last_bad"
    assert world.task.log_phi_max == pytest.approx(math.log1p(1e-3))
    expected = torch.log(torch.tensor([1.0, 0.0]) + 1e-3)
    assert torch.allclose(world.task.log_phi(ids("a mat bad", "bad a mat")), expected)
    assert SEEN == {
        "conditional": False,
        "dtype": torch.float32,
        "squash": None,
        "own": {"width": 7},
    }
    assert world.model.twist is not None and isinstance(world.learner, CTL)


@pytest.mark.parametrize(
    "method,overrides,twist,policy",
    [
        ("ctl", [], True, False),
        ("ppo", ["method.policy=mlp_head"], False, True),
        ("gfn", ["method.loss=tb"], False, True),
        ("gfn", ["method.loss=subtb"], True, True),  # the flow head is the twist
        ("none", [], True, False),  # eval/sample of an untrained twist
    ],
)
def test_the_world_is_what_the_learner_declares_it_needs(method, overrides, twist, policy):
    from smclm.build import build_world

    world = build_world(compose_train(f"method={method}", *overrides))
    assert (world.model.twist is not None, world.model.policy is not None) == (twist, policy)


def test_bad_targets_are_one_line():
    from smclm.build import build_world

    def fails(*overrides, match):
        with pytest.raises(ConfigError, match=match) as err:
            build_world(compose_train(*overrides))
        assert "\n" not in str(err.value)

    fails("task._target_=nowhere.build", match=r"task: cannot import nowhere.build .*PYTHONPATH")
    fails("method._target_=nowhere.Learner", match=r"method._target_=nowhere.Learner cannot be")
    fails("+task.colour=red", match=r"task \(smclm.tasks.toy.toy_task\): .*colour")
    fails("task=text_scorer", match=r"task.scorer must be set")


def test_build_has_no_name_dispatch():
    source = (REPO / "smclm" / "build.py").read_text()
    assert "name ==" not in source and "name in (" not in source
