"""The word-list scorer (smclm.tasks.scorers.word_count) on hand-made strings, its indicator
potential through task=text_scorer, experiment=word_threshold's composition, and
scripts/paper/fig3_word_threshold.sh in its smoke profile on a tiny GPT-2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_lm
from hydra import compose, initialize_config_module

from smclm.tasks.scorers import NEGATIVE_WORDS, word_count

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "text,words,expected",
    [
        ("a bad dog", ["bad"], 1),
        ("Bad, BAD dog; bAd!", ["bad"], 3),  # any case, punctuation is a boundary
        ("badly badge bad_dog abad bad2", ["bad"], 0),  # whole words only
        ("it's bad.bad", ["bad"], 2),
        ("", ["bad"], 0),
        ("red and blue and red", ["red", "blue"], 3),
        ("RED", "red,blue", 1),  # one comma-separated string (a command-line value)
        ("so very very bad", ["very bad", "very"], 2),  # "very", then "very bad" (no overlap)
        ("c++ and c", ["c++"], 1),  # a listed word with punctuation is escaped, not a regex
        ("a.b axb", ["a.b"], 1),
        ("naïve naive", ["naïve"], 1),  # Unicode letters are word characters
    ],
)
def test_word_count_counts_whole_words_ignoring_case(text, words, expected):
    assert word_count([text], words) == [expected]


def test_word_count_default_list_and_batch():
    assert "stupid" in NEGATIVE_WORDS and "mean" not in NEGATIVE_WORDS  # "I mean" is not unkind
    texts = ["My neighbour is a STUPID, evil man.", "My neighbour is kind.", "hateful hate"]
    assert word_count(texts) == [2, 0, 1]
    assert word_count([]) == []
    with pytest.raises(ValueError, match="words is empty"):
        word_count(["x"], [])
    with pytest.raises(ValueError, match="words is empty"):
        word_count(["x"], " , ")


def _cfg(*overrides: str):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_experiment_composes_the_indicator_on_the_continuation():
    cfg = _cfg("experiment=word_threshold")
    assert cfg.model.name == "smollm2" and cfg.twist.head == "mlp"
    assert cfg.evaluator.name == "bounds"
    t = cfg.task
    assert t._target_ == "smclm.tasks.text_scorer.text_scorer_task"
    assert t.scorer._target_ == "smclm.tasks.scorers.word_count" and t.scorer._partial_
    assert tuple(t.scorer.words) == NEGATIVE_WORDS  # the config records the built-in list
    assert (t.form, t.threshold, t.text, t.output_len) == ("indicator", 0.5, "continuation", 8)
    for method in ("ctl", "rl", "sixo", "fudge", "dpg", "ppo"):
        c = _cfg("experiment=word_threshold", f"method={method}")
        assert c.method.name == method and c.method.lr > 0
    assert _cfg("experiment=word_threshold", "method=ppo").method.policy == "mlp_head"


def test_the_potential_is_the_indicator_of_a_listed_word(toy_world):
    """text_scorer with word_count: log φ = 0 when the continuation has a listed word, log ε
    otherwise; the prompt is not scored (task.text=continuation); rejection sampling's bound is
    log(1 + ε), so exact samples need no task.score_max."""
    from smclm.tasks.plugin import TaskEnv
    from smclm.tasks.text_scorer import text_scorer_task

    base, tok = toy_world
    prompt = torch.tensor(tok("the cat")["input_ids"])
    env = TaskEnv(tok, base, torch.device("cpu"), prompt)
    task = text_scorer_task(
        env, name="w", prompt="the cat", output_len=3, text="continuation", form="indicator",
        threshold=0.5, scorer=lambda texts: word_count(texts, ["cat"]),
    )  # fmt: skip
    ids = torch.tensor([tok(s)["input_ids"] for s in ("sat on a", "a cat sat", "cat cat a")])
    log_phi = task.log_phi(ids)
    assert log_phi[0].item() == pytest.approx(math.log(1e-16), rel=1e-5)
    assert log_phi[1:].tolist() == [0.0, 0.0]
    assert task.log_phi_max == pytest.approx(math.log1p(1e-16))


@pytest.mark.slow  # six trainings and six evaluations as subprocesses: about a minute of CPU
def test_the_smoke_script_runs_end_to_end(tmp_path):
    """fig3_word_threshold.sh --profile smoke on a tiny GPT-2 over the toy world's words: every
    method trains, each trained run gets the bounds at every K for both proposals, and the report,
    table and both plots are written."""
    lm = tmp_path / "gpt2"
    save_tiny_lm(lm, "gpt2")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SMCLM_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = ROOT / "scripts" / "paper" / "fig3_word_threshold.sh"
    args = ["--profile", "smoke", "--out", str(out), f"model.name={lm}", "device=cpu",
            "task.prompt=the", "task.output_len=3", "task.scorer.words=[cat]"]  # fmt: skip
    proc = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(out.glob("runs/all/*/config.yaml"))
    methods = {yaml.safe_load(p.read_text())["method"]["name"] for p in runs}
    assert methods == {"ctl", "rl", "sixo", "fudge", "dpg", "ppo"}
    for cfg_path in runs:
        cfg = yaml.safe_load(cfg_path.read_text())
        assert cfg["paper"]["profile"] == "smoke" and cfg["paper"]["result"] == "none"
        assert cfg["task"]["scorer"]["words"] == ["cat"]
        summary = json.loads((cfg_path.parent / "eval" / "summary.json").read_text())
        for prefix in ("bounds", "bounds_p0"):
            for k in (1, 4):
                assert math.isfinite(summary[f"{prefix}/k{k}/log_z_lower_sis"]), (prefix, k)
    for png in ("kl_curves.png", "log_z_bounds.png"):
        assert (out / png).stat().st_size > 1000, png
    report = (out / "report.md").read_text()
    assert "fig3_word_threshold.sh --profile smoke" in report
    assert "| ctl |" in (out / "table.md").read_text()
