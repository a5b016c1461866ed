"""The real `smclm` command, end to end, with tiny settings (subprocesses, offline)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_smclm

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SMCLM_CACHE": "", "PYTHONUNBUFFERED": "1"}
TINY_TRAIN = [
    "train.updates=2",
    "train.eval_every=1",
    "smc.n_particles=8",
    "task.output_len=3",
    "train.progress=false",
]


def smclm(*args, cwd=None, cache=None, timeout=300):
    env = {"SMCLM_CACHE": "" if cache is None else cache}
    return run_smclm(*args, cwd=cwd, env=env, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("smclm: error")]


def test_no_command_prints_usage_and_exits_2():
    proc = smclm()
    assert proc.returncode == 2
    assert "usage: smclm <command>" in proc.stderr


def test_sample_prints_weighted_samples_and_log_z_hat():
    proc = smclm("sample", "n=5", "seed=1")
    assert proc.returncode == 0, proc.stderr
    assert "log Z-hat =" in proc.stdout
    assert len([ln for ln in proc.stdout.splitlines() if ln.strip().startswith("0.")]) == 5


@pytest.mark.parametrize("arch", ["gpt_neo", "gpt2"])
def test_sample_with_a_real_architecture_from_a_local_directory(tiny_lm_dirs, arch):
    proc = smclm(
        "sample",
        "model=tinystories",
        f"model.name={tiny_lm_dirs[arch]}",
        "model.dtype=float32",
        "twist=linear",
        "n=4",
        "task.prompt=the cat",
    )
    assert proc.returncode == 0, proc.stderr
    assert "log Z-hat =" in proc.stdout


# Bad input to every command (one line, exit 2, nothing written): tests/test_bad_input.py


def test_eval_without_a_run_writes_exact_summary(tmp_path):
    proc = smclm("eval", "task.output_len=3", f"hydra.run.dir={tmp_path}/ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    for key in ("log_z/exact", "kl/q_sigma_exact", "kl/sigma_q_exact"):
        assert isinstance(summary[key], float)
    # the untrained twist is ψ ≡ 1, so its proposal is p₀: KL(σ‖p₀) = −log Z for an indicator
    assert abs(summary["kl/sigma_q_exact"] + summary["log_z/exact"]) < 1e-3


def test_eval_of_a_run_at_another_output_len(tmp_path):
    """`smclm eval run=… output_len=N` evaluates the trained twist at T = N (the paper's Table 4
    evaluates longer than it trains); without it the run's T; a bad value is one line."""
    run = tmp_path / "run"
    args = ["method=ctl", "train.updates=1", "train.eval_every=1", "smc.n_particles=4"]
    proc = smclm("train", *args, "task.output_len=2", "train.progress=false",
                 f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = smclm("eval", f"run={run}", "output_len=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "output_len: 3" in (run / "eval" / "config.yaml").read_text()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    # exact enumeration over the V³ outputs of the toy LM: log Z of T = 3, not of the run's T = 2
    trained = json.loads((run / "summary.json").read_text())
    assert summary["log_z/exact"] != trained["log_z/exact"]
    proc = smclm("eval", f"run={run}", "output_len=0", cwd=tmp_path)
    assert proc.returncode == 2 and len(error_lines(proc)) == 1
    assert "output_len=0 must be null" in error_lines(proc)[0]


def test_cfg_job_prints_the_composed_config():
    proc = smclm("train", "method=rl", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: rl" in proc.stdout and "n_particles:" in proc.stdout


@pytest.mark.parametrize("method", ["ctl", "rl", "sixo", "fudge", "dpg"])
def test_train_each_method_writes_a_complete_run_dir(tmp_path, method):
    run = tmp_path / "run"
    proc = smclm("train", f"method={method}", *TINY_TRAIN, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file()
    assert (run / "checkpoints" / "step_2" / "params.safetensors").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "kl/sigma_q_exact" in r] == [0, 1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run/method"] == method and summary["run/updates"] == 2
    assert "train/loss" in summary and "kl/sigma_q_exact" in summary


def test_sigterm_leaves_a_checkpoint_that_resumes(tmp_path):
    run = tmp_path / "run"
    args = [
        "train",
        "method=ctl",
        "smc.n_particles=8",
        "task.output_len=3",
        "train.eval_every=100000",
        "train.progress=false",
        f"hydra.run.dir={run}",
    ]
    env = dict(ENV)
    proc = subprocess.Popen(
        [sys.executable, "-m", "smclm.cli", *args, "train.updates=100000"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume=true" in err
    ckpts = sorted(run.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1]))
    stopped_at = int(ckpts[-1].name.split("_")[1])
    assert stopped_at >= 3
    resumed = smclm(*args, f"train.updates={stopped_at + 2}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 2
    assert len([s for s in steps if s == stopped_at + 1]) == 1


def test_existing_run_dir_without_resume_is_refused(tmp_path):
    run = tmp_path / "run"
    assert smclm("train", *TINY_TRAIN, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    again = smclm("train", *TINY_TRAIN, f"hydra.run.dir={run}", cwd=tmp_path)
    assert again.returncode == 2 and "resume=true" in error_lines(again)[0]


def test_multirun_sweep_then_table_and_plot(tmp_path):
    sweep = tmp_path / "sweep"
    proc = smclm(
        "train",
        "-m",
        "method=ctl,dpg",
        "seed=0,1",
        *TINY_TRAIN,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list(sweep.glob("*/summary.json"))) == 4
    table = smclm("table", str(sweep))
    assert table.returncode == 0, table.stderr
    md = (sweep / "table.md").read_text()
    assert "ctl" in md and "dpg" in md and (sweep / "table.csv").is_file()
    plot = smclm("plot", str(sweep))
    assert plot.returncode == 0, plot.stderr
    pngs = list(sweep.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_package_configs_are_found_from_any_directory(tmp_path):
    assert Path(tmp_path).is_dir()
    proc = smclm("sample", "n=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_wandb_offline_logger_needs_no_network(tmp_path):
    run = tmp_path / "run"
    proc = smclm(
        "train",
        *TINY_TRAIN,
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert list((run / "wandb").glob("offline-run-*"))


def test_real_task_runs_and_load_errors_through_the_cli(
    tmp_path, tiny_lm_dirs, tiny_classifier_dirs
):
    """task=sentiment on tiny GPT-2 + BERT through the real command; a classifier that cannot be
    loaded offline, or a causal LM given as the classifier, is one line and exit 2."""
    common = [
        "task=sentiment",
        f"model.name={tiny_lm_dirs['gpt2']}",
        "task.prompt=the cat",
        *TINY_TRAIN,
        "evaluator=none",
    ]
    ok = smclm(
        "train", *common, f"task.classifier={tiny_classifier_dirs['sentiment']}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
    for clf, msg in (
        ("nobody/no-such-classifier", "could not load task.classifier=nobody/no-such-classifier"),
        (tiny_lm_dirs["gpt_neo"], "is a GPTNeoForCausalLM, not a sequence classifier"),
    ):
        bad = smclm("train", *common, f"task.classifier={clf}", f"hydra.run.dir={tmp_path / 'x'}")
        assert bad.returncode == 2
        lines = error_lines(bad)
        assert len(lines) == 1 and msg in lines[0], bad.stderr[-2000:]


@pytest.mark.parametrize(
    "method,task",
    [("ppo", "sentiment"), ("gfn", "infilling")],
)
def test_policy_learners_through_the_cli(
    method, task, tmp_path, tiny_lm_dirs, tiny_classifier_dirs
):
    """PPO and GFlowNet end to end through the real command on tiny real-architecture models."""
    args = [
        f"method={method}",
        f"task={task}",
        "task.prompt=the cat",
        *TINY_TRAIN,
        "evaluator=bounds",
        "evaluator.particles=[4]",
        "evaluator.n_exact=2",
        "exact_samples.n=8",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    if task == "sentiment":
        args += [f"model.name={tiny_lm_dirs['gpt2']}", "method.policy=mlp_head",
                 f"task.classifier={tiny_classifier_dirs['sentiment']}"]  # fmt: skip
    else:
        args += [f"model.name={tiny_lm_dirs['gpt_neo']}", "task.cond_len=2",
                 "method.policy=separate_conditional", "method.pilot_samples=8"]  # fmt: skip
    proc = smclm("train", *args, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run/method"] == method
    assert f"{method}/kl" in summary or f"{method}/loss" in summary
    assert "bounds/log_z_lower_sis" in summary and "bounds/log_z_lower_smc" not in summary
    assert summary["compute/total_policy_forward_calls"] > 0
