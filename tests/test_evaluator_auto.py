"""evaluator=auto (the default): exact when Vᵀ per o is enumerable, else bounds; the choice is
recorded in the run's config and summary."""

import json
import os
import subprocess
import sys

import torch
import yaml
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.config import validate
from smclm.evaluate import Evaluator, choose_evaluator, evaluate


def make_cfg(name, *overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_choose_evaluator_compares_v_to_the_t_with_max_sequences():
    assert choose_evaluator(12, 4, 1_000_000) == "exact"  # 20736
    assert choose_evaluator(10, 6, 1_000_000) == "exact"  # exactly the limit
    assert choose_evaluator(10, 7, 1_000_000) == "bounds"
    assert choose_evaluator(49152, 2, 1_000_000) == "bounds"  # SmolLM2 / GPT-2 vocabularies
    assert choose_evaluator(49152, 1, 1_000_000) == "exact"


def test_auto_is_the_default_and_validates():
    for name in ("train", "eval"):
        cfg = make_cfg(name)
        assert cfg.evaluator.name == "auto"
        validate(cfg)
    # bounds' settings come with it (auto.yaml starts from bounds.yaml)
    auto, bounds = make_cfg("train").evaluator, make_cfg("train", "evaluator=bounds").evaluator
    assert {k: v for k, v in auto.items() if k != "name"} == {
        k: v for k, v in bounds.items() if k != "name"
    }


def test_auto_picks_exact_for_the_toy_world_and_records_it(tmp_path):
    cfg = make_cfg("eval", "device=cpu", "task.output_len=3")
    summary = evaluate(cfg, tmp_path)
    assert summary["run/evaluator"] == "exact"
    assert "log_z/exact" in summary
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["evaluator"]["name"] == "exact"
    assert json.loads((tmp_path / "summary.json").read_text())["run/evaluator"] == "exact"


def test_auto_picks_bounds_for_a_tiny_real_architecture(tiny_lm_dirs):
    # V = 12, T = 6: 12⁶ ≈ 3e6 sequences > max_sequences = 1e6
    cfg = make_cfg(
        "train",
        "model=tinystories",
        f"model.name={tiny_lm_dirs['gpt_neo']}",
        "model.dtype=float32",
        "device=cpu",
        "task.output_len=6",
    )
    ev = Evaluator(cfg, build_world(cfg), None)
    assert ev.name == "bounds" and cfg.evaluator.name == "bounds"
    assert ev.needs_pool and not ev.exact_available
    cfg = make_cfg(
        "train",
        f"model.name={tiny_lm_dirs['gpt_neo']}",
        "device=cpu",
        "task.output_len=6",
        "evaluator.max_sequences=3000000",
    )
    assert Evaluator(cfg, build_world(cfg), None).name == "exact"


def _classifier_near_threshold(src, dst, texts, threshold):
    """The tiny one-logit classifier rescaled so that its logit r straddles η on ``texts``
    (a random tiny classifier's r is ~0, so no text would pass r < η = −5)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        r = model(**tok(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
        scale = 2.0 / float(r.std())
        head = model.classifier.out_proj
        head.weight.mul_(scale)
        head.bias.mul_(scale).add_(threshold - float(r.median()) * scale)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return str(dst)


def test_toxicity_ctl_runs_as_typed_with_bounds(tiny_lm_dirs, tiny_classifier_dirs, tmp_path):
    """`smclm train task=toxicity method=ctl` with its defaults (Figure 3's threshold task,
    T = 10, evaluator=auto): bounds, not a refusal to enumerate Vᵀ."""
    from smclm.models.toy import build_toy_tokenizer

    # texts like the run's: "the" and 10 words of the tiny LM's vocabulary
    ids = torch.randint(0, 11, (64, 10), generator=torch.Generator().manual_seed(0))
    texts = ["the " + t for t in build_toy_tokenizer(12).batch_decode(ids.tolist())]
    clf = _classifier_near_threshold(
        tiny_classifier_dirs["toxicity"], tmp_path / "clf", texts, -5.0
    )
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMCLM_CACHE": str(tmp_path / "cache")}
    args = [
        "train",
        "task=toxicity",
        "method=ctl",
        f"model.name={tiny_lm_dirs['gpt_neo']}",
        f"task.classifier={clf}",
        "task.prompt=the",  # the tiny LM's word-level vocabulary has no "Once upon a time"
        # shorter than the defaults (64 updates, K = 32 and 500) to keep the suite fast
        "train.updates=2",
        "train.eval_every=2",
        "evaluator.particles=[8]",
        "train.progress=false",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "smclm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run/evaluator"] == "bounds"
    assert "bounds/log_z_lower_smc" in summary and "bounds/log_z_upper_smc" in summary
    assert yaml.safe_load((run / "config.yaml").read_text())["evaluator"]["name"] == "bounds"


def test_eval_and_sample_of_a_run_with_particles_per_cond(tiny_lm_dirs, tmp_path, capsys):
    """`smclm eval run=…` and `smclm sample run=…` of an infilling run trained with
    method.particles_per_cond (infilling_2's 10 o × 10 particles): the commands' own smc
    settings (default N = 64) must not make the run's training settings invalid."""
    from smclm.sample import sample
    from smclm.train import train

    model = [f"model.name={tiny_lm_dirs['gpt_neo']}", "device=cpu", "task.prompt=the"]
    cache = f"exact_samples.cache_dir={tmp_path / 'exact'}"
    run = tmp_path / "run"
    cfg = make_cfg(
        "train",
        "experiment=infilling_2",
        *model,
        cache,
        "smc.n_particles=12",
        "method.particles_per_cond=3",  # divides 12, not the commands' N = 64
        "train.updates=1",
        "exact_samples.n=16",
        "evaluator.particles=[4]",
        "evaluator.n_exact=2",
        "train.progress=false",
    )
    train(cfg, run)
    summary = evaluate(make_cfg("eval", f"run={run}", cache, "evaluator.particles=[4]"))
    assert summary["run/evaluator"] == "exact"  # V = 12, T = 2: 144 sequences per o
    sample(make_cfg("sample", f"run={run}", "n=5"))
    assert "log Z-hat =" in capsys.readouterr().out
