"""Hu et al.'s Figure 3 end to end (issue 23): evaluator=sentences on a tiny GPT-2 (keys, finite
values, the run's own sampler, samples that end at a stop, the generate baselines), the
fig3_sentences.png plot from hand-made run directories, and scripts/paper/gfn_fig3_next_sentence.sh
in its smoke profile."""

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
from conftest import byte_level_tokenizer, save_tiny_gpt2_with
from hydra import compose, initialize_config_module

from smclm.build import build_world
from smclm.errors import ConfigError
from smclm.evaluate import Evaluator, evaluate
from smclm.evaluators import sentences
from smclm.evaluators.sentences import check_samples, draw_sentences
from smclm.report.plot import make_plots, sentence_points
from smclm.report.table import find_runs

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("max_log_lik", "mean_log_lik", "diversity", "mean_len")


def small_tokenizer():
    """A GPT-2-style byte-level BPE (vocabulary 300) trained on the built-in prompts."""
    from smclm.tasks.next_sentence import builtin_prompts

    return byte_level_tokenizer(builtin_prompts() * 3, 300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_gpt2_with(small_tokenizer(), tmp_path_factory.mktemp("fig3_gpt2"))


def _cfg(config: str, *overrides: str):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose(config, overrides=list(overrides))


def _sentence_cfg(tiny_dir, config="train", *extra):
    return _cfg(
        config,
        "task=next_sentence",
        f"model.name={tiny_dir}",
        "device=cpu",
        "task.output_len=8",
        "evaluator=sentences",
        "evaluator.n_samples=3",
        "evaluator.n_prompts=2",
        "evaluator.embedder=lm",
        "smc.n_particles=4",
        *extra,
    )


def test_eval_without_a_run_scores_p0_and_the_baselines(tiny_dir, tmp_path):
    cfg = _sentence_cfg(
        tiny_dir,
        "eval",
        "twist=none",
        "evaluator.baselines=[greedy,diverse_beam,sample_tempered]",
        "evaluator.tau=[0.5,0.9]",
    )
    out = evaluate(cfg, tmp_path)
    assert out["run/evaluator"] == "sentences" and out["sent/sampler"] == "p0"
    for prefix in (
        "sent",
        "sent/greedy",
        "sent/sample_tempered_tau0.5",
        "sent/sample_tempered_tau0.9",
    ):
        for key in METRICS:
            assert math.isfinite(out[f"{prefix}/{key}"]), (prefix, key)
        assert out[f"{prefix}/mean_log_lik"] <= out[f"{prefix}/max_log_lik"] + 1e-6
        assert 2 <= out[f"{prefix}/mean_len"] <= 8  # min_len 2 … the cap
    assert out["sent/greedy/max_log_lik"] == pytest.approx(out["sent/greedy/mean_log_lik"])
    assert out["sent/greedy/diversity"] == pytest.approx(0.0, abs=1e-9)  # one sample, n times
    assert out["sent/sample_tempered_tau0.5/tau"] == 0.5
    assert "sent/diverse_beam/max_log_lik" not in out
    assert "trust_remote_code" in out["sent/diverse_beam/skipped"]
    assert "NOT the paper's" in out["sent/embedder"]
    # φ ≡ 1 (τ = 1) and the masked proposal's weights are ≤ 1: log Ẑ ≤ log Z ≤ 0
    assert out["sent/log_z_hat"] <= 0 and math.isfinite(out["sent/log_z_hat"])
    assert (out["sent/n_prompts"], out["sent/n_samples"]) == (2, 3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sent/max_log_lik"] == out["sent/max_log_lik"]


@pytest.mark.parametrize(
    "overrides,untrained,expected",
    [
        (("method=ctl",), False, "twisted_smc"),
        (("method=ctl",), True, "p0"),  # smclm eval without run=: the twist is untrained
        (("method=gfn", "method.policy=mlp_head", "method.loss=modified_subtb"), False, "policy"),
        (("method=ctl", "twist=none"), False, "p0"),
    ],
)
def test_the_sampler_is_the_runs_and_its_samples_end_at_a_stop(
    tiny_dir, monkeypatch, overrides, untrained, expected
):
    cfg = _sentence_cfg(tiny_dir, "train", "smc.ess_threshold=0.5", *overrides)
    world = build_world(cfg)
    calls = []
    real = sentences.run_smc

    def spy(model, *args, **kw):
        calls.append((model.policy is not None, model.twist is not None, args[3], kw))
        return real(model, *args, **kw)

    monkeypatch.setattr(sentences, "run_smc", spy)
    ev = Evaluator(cfg, world, None, untrained=untrained)
    assert ev.on_samples.sampler == expected
    out = ev(step=0)
    assert out["sent/sampler"] == expected and len(calls) == 2  # one run per test prompt
    for policy, twist, k, kw in calls:
        assert (policy, twist) == (expected == "policy", expected == "twisted_smc")
        if expected == "twisted_smc":  # the run's SMC (K, resampling), then n draws
            assert k == 4 and kw["ess_threshold"] == 0.5
        else:  # n independent draws
            assert k == 3 and kw["ess_threshold"] == 0.0
    task = world.task
    gen = torch.Generator().manual_seed(1)
    group, log_z = draw_sentences(
        world.model, task.for_prompt(task.test_prompts[1]), 5, expected,
        n_particles=4, resampling="multinomial", ess_threshold=0.5, generator=gen,
    )  # fmt: skip
    assert len(group) == 5 and math.isfinite(log_z)
    check_samples(group, task.stop_ids)  # each ends in its (only) stop
    assert all(task.min_len <= len(s) <= task.output_len for s in group)


def test_bad_settings_are_refused_in_one_line(tiny_dir):
    cfg = _cfg("eval", "evaluator=sentences", "twist=none", "device=cpu")
    world = build_world(cfg)  # the toy task: fixed length, no stop
    with pytest.raises(ConfigError, match="evaluator=sentences needs a task that stops"):
        Evaluator(cfg, world, None)
    cfg = _sentence_cfg(tiny_dir, "eval", "twist=none", "evaluator.baselines=[beam,bream]")
    with pytest.raises(ConfigError, match=r"unknown bream; pick from beam, diverse_beam"):
        Evaluator(cfg, build_world(cfg), None)


def _run_dir(path: Path, method: str, tau: float | None, summary: dict) -> None:
    path.mkdir(parents=True)
    task = {"name": "next_sentence"} if tau is None else {"name": "next_sentence", "tau": tau}
    (path / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method}, "task": task}))
    (path / "summary.json").write_text(json.dumps(summary))


def test_the_figure_3_plot_from_hand_made_runs(tmp_path):
    root = tmp_path / "sweep"
    _run_dir(root / "gfn_a", "gfn", 0.8, {"sent/diversity": 0.2, "sent/max_log_lik": -10.0})
    _run_dir(root / "gfn_b", "gfn", 0.8, {"sent/diversity": 0.4, "sent/max_log_lik": -12.0})
    _run_dir(root / "ctl", "ctl", 0.9, {"sent/diversity": 0.3, "sent/max_log_lik": -11.0})
    baselines = {
        "sent/diversity": 0.5,
        "sent/max_log_lik": -20.0,
        "sent/beam/diversity": 0.0,
        "sent/beam/max_log_lik": -8.0,
        "sent/sample_tempered_tau0.8/diversity": 0.25,
        "sent/sample_tempered_tau0.8/max_log_lik": -15.0,
        "sent/sample_tempered_tau0.8/tau": 0.8,
        "sent/diverse_beam/skipped": "unavailable offline",
        "sent/embedder": "lm-input-embedding-mean",
    }
    _run_dir(root / "baselines", "none", 1.0, baselines)
    points = sentence_points(find_runs(root))
    assert points == {
        "gfn τ=0.8": (pytest.approx(0.3), pytest.approx(-11.0), 2),
        "ctl (twisted SMC) τ=0.9": (0.3, -11.0, 1),
        "p₀ τ=1": (0.5, -20.0, 1),
        "beam": (0.0, -8.0, 1),
        "sample_tempered τ=0.8": (0.25, -15.0, 1),
    }
    # smclm table: one row per task (and τ) × method, and one per generate baseline
    from smclm.report.table import build_rows, render_markdown

    rows = {(r["task"], r["method"]): r for r in build_rows(find_runs(root))}
    assert set(rows) == {
        ("next_sentence (τ=0.8)", "gfn"),
        ("next_sentence (τ=0.9)", "ctl"),
        ("next_sentence", "none"),
        ("next_sentence", "beam (generate)"),
        ("next_sentence", "sample_tempered_tau0.8 (generate)"),
    }
    gfn_row = rows[("next_sentence (τ=0.8)", "gfn")]
    assert gfn_row["sent_diversity"] == pytest.approx(0.3) and gfn_row["n"] == 2
    assert gfn_row["sent_max_log_lik_ci95"] == pytest.approx(1.96 * math.sqrt(2) / math.sqrt(2))
    assert rows[("next_sentence", "beam (generate)")]["sent_max_log_lik"] == -8.0
    md = render_markdown(build_rows(find_runs(root)))
    assert "| max log-lik | mean log-lik | diversity | length |" in md
    assert "| beam (generate) |" in md
    written = make_plots(root)
    assert root / "fig3_sentences.png" in written
    assert (root / "fig3_sentences.png").stat().st_size > 1000
    # runs without sent/* metrics: no Figure 3
    other = tmp_path / "other"
    _run_dir(other / "r", "ctl", None, {"kl/q_sigma": 1.0})
    make_plots(other)
    assert not (other / "fig3_sentences.png").exists()


def test_the_smoke_script_runs_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SMCLM_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = ROOT / "scripts" / "paper" / "gfn_fig3_next_sentence.sh"
    args = ["--profile", "smoke", "--out", str(out), f"model.name={tiny_dir}", "device=cpu"]
    proc = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    gfn = json.loads(next(out.glob("runs/gfn_tau0.9/*/summary.json")).read_text())
    ctl = json.loads(next(out.glob("runs/ctl/*/summary.json")).read_text())
    base = json.loads((out / "runs" / "baselines" / "summary.json").read_text())
    assert (gfn["sent/sampler"], ctl["sent/sampler"], base["sent/sampler"]) == (
        "policy", "twisted_smc", "p0"
    )  # fmt: skip
    # the curriculum τ_R: 1/τ → 1 over H = 2 updates; the last update (k = 1) is half-way
    assert gfn["gfn/tau_r"] == pytest.approx((1 / 0.9 + 1) / 2)
    cfg = yaml.safe_load(next(out.glob("runs/gfn_tau0.9/*/config.yaml")).read_text())
    assert cfg["task"]["tau"] == 0.9 and cfg["method"]["tau_r_start"] == pytest.approx(1 / 0.9)
    assert cfg["method"]["loss"] == "modified_subtb" and cfg["method"]["policy"] == "lora"
    assert cfg["paper"]["profile"] == "smoke"
    for key in ("beam", "nucleus", "sample", "sample_tempered", "greedy"):
        assert math.isfinite(base[f"sent/{key}/max_log_lik"]), key
    assert "sent/diverse_beam/skipped" in base
    # the σ reference: importance resampling from p₀ (untrained twist, K = 16 particles)
    sir = json.loads((out / "runs" / "p0_sir_tau0.9" / "summary.json").read_text())
    assert sir["sent/sampler"] == "twisted_smc" and math.isfinite(sir["sent/max_log_lik"])
    assert "| p0_sir_K16 |" in (out / "table.md").read_text()
    assert (out / "fig3_sentences.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "gfn_fig3_next_sentence.sh --profile smoke" in report
    assert "no paper numbers" in report and (out / "table.md").is_file()
