"""scripts/paper/*.sh end to end on tiny real-architecture models, the reproduction report beside
the paper's numbers, and `smclm table --at` (equal compute) on hand-made run directories."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from smclm.cli import main as smclm_main
from smclm.errors import UserError
from smclm.report.paper import paper_result
from smclm.report.table import find_runs, make_table, metrics_at, parse_budget

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "paper"
DATA = yaml.safe_load((ROOT / "smclm" / "report" / "paper_results.yaml").read_text())


def script_env(cache):
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SMCLM_CACHE": str(cache),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_script(name, *args, cache, timeout=600):
    return subprocess.run(
        ["bash", str(SCRIPTS / f"{name}.sh"), *args],
        capture_output=True,
        text=True,
        env=script_env(cache),
        cwd=cache.parent,
        timeout=timeout,
    )


def tiny_overrides(name, lms, classifiers):
    """Tiny models for each script's task (prompt words the toy tokenizer knows)."""
    if "sentiment" in name:
        over = [f"model.name={lms['gpt2']}", f"task.classifier={classifiers['sentiment']}"]
    else:
        over = [f"model.name={lms['gpt_neo']}"]
        if "toxicity" in name:
            over.append(f"task.classifier={classifiers['toxicity']}")
    if name.startswith("fig3"):
        over.append("task.threshold=0")  # the tiny classifier's logits are near 0, never < -5
    return [*over, "task.prompt=the cat"]


def csv_rows(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))


def check_report(name: str, out: Path) -> None:
    """One row per method (and variant) of the paper's result, the paper's values beside ours."""
    result_name = name.split("_")[0]
    entry = DATA["results"][result_name]
    variants = list(entry.get("variants") or {"": {}})
    rows = csv_rows(out)
    assert [(r["method"], r["variant"]) for r in rows] == [
        (m, v) for m in entry["methods"] for v in variants
    ]
    md = (out / "table.md").read_text()
    assert entry["title"] in md and "Profile: smoke." in md
    assert "**Model differs from the paper's:**" in md  # tiny models, not the paper's
    for row in rows:
        assert row["paper_result"] == result_name and row["n"] == "1"
        paper = entry["methods"][row["method"]] or {}
        paper = paper.get(row["variant"], {}) if row["variant"] else paper
        for key in ("kl_q_sigma", "kl_sigma_q"):
            ours = float(row[key])  # every method ran and was evaluated
            if paper:
                mean, ci = paper[key]
                assert float(row[f"paper_{key}"]) == mean and float(row[f"paper_{key}_ci95"]) == ci
                assert float(row[f"diff_{key}"]) == pytest.approx(ours - mean)
                assert f"{mean:.2f} ± {ci:.2f}" in md
            else:
                assert row[f"paper_{key}"] == ""  # Figure 3: no numbers in the paper
    report = (out / "report.md").read_text()
    assert report.startswith(md) and f"scripts/paper/{name}.sh --profile smoke" in report
    assert (out / "kl_curves.png").stat().st_size > 1000
    cfg = OmegaConf.load(next(out.glob("runs/*/*/config.yaml")))
    assert cfg.paper.result == result_name and cfg.paper.profile == "smoke"
    assert "train.updates=2" in cfg.paper.reductions


@pytest.fixture(scope="module")
def table8(tmp_path_factory, tiny_lm_dirs, tiny_classifier_dirs):
    root = tmp_path_factory.mktemp("table8")
    over = tiny_overrides("table8_infilling2", tiny_lm_dirs, tiny_classifier_dirs)
    proc = run_script(
        "table8_infilling2", "--profile", "smoke", "--out", str(root / "out"), *over,
        cache=root / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, over, proc


def test_table8_smoke_report(table8):
    root, _, proc = table8
    check_report("table8_infilling2", root / "out")
    assert f"results in {root / 'out'}" in proc.stdout
    runs = find_runs(root / "out")
    assert len(runs) == 6
    for run in runs:  # every evaluation record carries the running compute totals
        rows = run.metrics()
        evals = [r for r in rows if "time/eval_s" in r and r["step"] > 0]
        assert evals
        for ev in evals:
            sampled = sum(
                r.get("compute/sampled_tokens", 0) for r in rows if 0 < r["step"] <= ev["step"]
            )
            assert ev["compute/total_sampled_tokens"] == sampled > 0
            assert ev["time/total_update_s"] > 0


def run_local(table8, name, *methods):
    root, over, _ = table8
    out = root / name
    proc = run_script(
        "table8_infilling2", "--profile", "smoke", "--launcher", "local", "--out", str(out),
        *over, *methods, cache=root / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(out.glob("runs/all/.submitit/*"))  # the jobs went through submitit
    assert "--launcher local" in (out / "report.md").read_text()
    return root / "out", out


def test_table8_through_submitit_local_gives_the_same_rows(table8):
    """--launcher local (hydra/launcher=submitit_local: the jobs are real subprocesses) for two of
    the methods: their rows are those of the default launcher's report (log Z is exact here, so it
    does not depend on which runs are in the table)."""
    default, local = run_local(table8, "local2", "method=ctl,ppo")
    rows = {r["method"]: r for r in csv_rows(default)}
    for row in csv_rows(local):
        if row["n"] != "0":
            assert row == rows[row["method"]]
    assert [r["method"] for r in csv_rows(local) if r["n"] != "0"] == ["ctl", "ppo"]
    lines = (default / "table.md").read_text().splitlines()
    for line in (local / "table.md").read_text().splitlines():
        if line.startswith(("| ctl |", "| ppo |", "log Z =")):
            assert line in lines


@pytest.mark.slow
def test_table8_through_submitit_local_gives_the_same_report(table8):
    default, local = run_local(table8, "local")
    assert (local / "table.md").read_text() == (default / "table.md").read_text()
    assert (local / "table.csv").read_text() == (default / "table.csv").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    sorted(
        p.stem
        for p in SCRIPTS.glob("*.sh")
        if not p.name.startswith(("_", "table8", "gfn_")) and "\nRESULT=none\n" not in p.read_text()
    ),  # RESULT=none: no paper numbers to report beside (fig3_word_threshold: its own test)
)
def test_every_paper_script_smoke_report(name, tmp_path, tiny_lm_dirs, tiny_classifier_dirs):
    out = tmp_path / "out"
    over = tiny_overrides(name, tiny_lm_dirs, tiny_classifier_dirs)
    proc = run_script(name, "--profile", "smoke", "--out", str(out), *over, cache=tmp_path / "c")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_report(name, out)
    if name.startswith("fig3"):  # Figure 3's bounds from the extra evaluation at every K
        summary = json.loads(next(out.glob("runs/all/*/eval/summary.json")).read_text())
        for k in (1, 4, 8):
            assert f"bounds_p0/k{k}/log_z_lower_sis" in summary
        assert (out / "log_z_bounds.png").stat().st_size > 1000


RECORDED = re.compile(r"^Command \((.*)\), run from (.*):\n\n```\n(.*)\n```$", re.M)


def test_recorded_command_reruns_the_same_runs(tmp_path, tiny_lm_dirs, tiny_classifier_dirs):
    """report.md's command is the invocation as given (method=, --out, an override with brackets
    and commas, one with a space): pasted into a shell with another --out, it makes the same runs
    and the same table rows."""
    over = tiny_overrides("table8_infilling2", tiny_lm_dirs, tiny_classifier_dirs)
    first, again = tmp_path / "first", tmp_path / "again"
    args = ["--profile", "smoke", "--out", str(first), *over, "evaluator.particles=[2,4]",
            "method=ctl,dpg"]  # fmt: skip
    assert "task.prompt=the cat" in args  # a space
    proc = run_script("table8_infilling2", *args, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (first / "report.md").read_text()
    (given, where, command), *more = RECORDED.findall(report)
    assert not more and given == "the arguments as given"
    assert where == f"`{tmp_path.resolve()}` (outside the repository)"
    assert shlex.split(command) == [str(SCRIPTS / "table8_infilling2.sh"), *args]
    assert "\n## Environment\n\n```\n" in report
    made_by = "\nMade by `smclm table . --paper table8` (in this directory).\n"
    assert (first / "table.md").read_text().endswith(made_by)
    assert command.count(shlex.quote(str(first))) == 1
    pasted = command.replace(shlex.quote(str(first)), shlex.quote(str(again)))
    proc = subprocess.run(
        ["bash", "-c", pasted], capture_output=True, text=True, env=script_env(tmp_path / "cache"),
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    def runs(out):
        found = find_runs(out)
        for run in found:  # the overrides reached every run as given
            cfg = OmegaConf.load(run.path / "config.yaml")
            assert list(cfg.evaluator.particles) == [2, 4] and cfg.task.prompt == "the cat"
        return sorted((run.method, run.seed) for run in found)

    assert runs(first) == runs(again) == [("ctl", 0), ("dpg", 0)]
    rows = csv_rows(first)
    assert [(r["method"], r["n"]) for r in rows] == [
        ("ctl", "1"), ("rl", "0"), ("sixo", "0"), ("fudge", "0"), ("dpg", "1"), ("ppo", "0")
    ]  # fmt: skip
    assert csv_rows(again) == rows
    (_, _, command_again), *_ = RECORDED.findall((again / "report.md").read_text())
    assert command_again == pasted


def test_every_result_has_a_script():
    # gfn_*: the GFlowNet paper's figures (no numbers here; tests/test_fig3_sentences.py)
    scripts = [p for p in SCRIPTS.glob("*.sh") if not p.name.startswith(("_", "gfn_"))]
    names = {p.stem.split("_")[0] for p in scripts}
    assert names == set(DATA["results"])


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--profile", "gpu"], "unknown profile 'gpu'; choose --profile paper, cpu or smoke"),
        (["--launcher", "pbs"], "unknown launcher 'pbs'"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        (
            ["method=ctl,gfn"],
            "table8 (Table 8: infilling, T = 2 tokens before c = 1 (E_o KL)) has "
            "no paper numbers for method gfn",
        ),  # fmt: skip
    ],
)
def test_script_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    proc = run_script(
        "table8_infilling2", *args, "--out", str(tmp_path / "o"), cache=tmp_path / "c"
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not list(tmp_path.glob("o/runs"))  # refused before any training


# -- smclm table --at: equal compute --------------------------------------------------------------

# Two methods whose updates cost differently: ctl samples 100 tokens per update, dpg 400.
# Evaluations after 0, 2, 4, 8 updates; f_q and g_q known at each; exact log Z = -2.
EVAL_STEPS = (0, 2, 4, 8)
COST = {"ctl": 100, "dpg": 400}
UPDATE_S = {"ctl": 0.5, "dpg": 0.25}


def f_q(method, seed, step):
    return -3.0 + 0.1 * step + (0.5 if method == "dpg" else 0.0) + 0.01 * seed


def g_q(method, seed, step):
    return -1.0 - 0.1 * step - (0.3 if method == "dpg" else 0.0) + 0.02 * seed


def write_budget_sweep(root: Path, with_totals: bool) -> Path:
    for i, (method, seed) in enumerate((m, s) for m in COST for s in (0, 1)):
        d = root / f"{i}_{method}_seed{seed}"
        d.mkdir(parents=True)
        cfg = {"task": {"name": "toy"}, "method": {"name": method}, "seed": seed}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        rows = []
        for step in range(9):
            if step > 0:
                rows.append(
                    {"step": step, "compute/sampled_tokens": COST[method],
                     "time/update_s": UPDATE_S[method], "train/loss": 1.0}
                )  # fmt: skip
            if step in EVAL_STEPS:
                ev = {
                    "step": step,
                    "bounds/f_q": f_q(method, seed, step),
                    "bounds/g_q": g_q(method, seed, step),
                    "log_z/exact": -2.0,
                    "time/eval_s": 3.0,
                }
                if with_totals and step > 0:  # the trainer's running totals (none at update 0)
                    ev["compute/total_sampled_tokens"] = COST[method] * step
                    ev["time/total_update_s"] = UPDATE_S[method] * step
                rows.append(ev)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        final = {**rows[-1], "run/method": method, "run/seed": seed}
        (d / "summary.json").write_text(json.dumps(final))
    return root


@pytest.mark.parametrize("with_totals", [True, False])
def test_table_at_budget_picks_the_evaluation_step_by_compute(tmp_path, with_totals):
    root = write_budget_sweep(tmp_path / "sweep", with_totals)
    for budget, expect in (
        ("compute/total_sampled_tokens=800", {"ctl": 8, "dpg": 2}),
        ("compute/total_sampled_tokens=1599", {"ctl": 8, "dpg": 2}),
        ("compute/total_sampled_tokens=1600", {"ctl": 8, "dpg": 4}),
        ("compute/total_sampled_tokens=399", {"ctl": 2, "dpg": 0}),
        ("time/total_update_s=1.0", {"ctl": 2, "dpg": 4}),
    ):
        _, rows = make_table(root, tmp_path / "out", at=budget)
        assert {r["method"]: r["at_step"] for r in rows} == expect, budget
        for row in rows:
            step, m = expect[row["method"]], row["method"]
            kq = [-2.0 - f_q(m, s, step) for s in (0, 1)]  # KL(q‖σ) = log Z − F_q
            ks = [g_q(m, s, step) + 2.0 for s in (0, 1)]  # KL(σ‖q) = G_q − log Z
            assert row["kl_q_sigma"] == pytest.approx(sum(kq) / 2)
            assert row["kl_sigma_q"] == pytest.approx(sum(ks) / 2)
    run = find_runs(root)[0]
    assert metrics_at(run, parse_budget("compute/total_sampled_tokens=0"))["at/step"] == 0
    # without --at: the final metrics (step 8 for both)
    _, rows = make_table(root, tmp_path / "out")
    assert [r["kl_q_sigma"] for r in rows] == pytest.approx([-2.0 - f_q(m, 0.5, 8) for m in COST])


def test_table_at_through_the_cli(tmp_path, capsys):
    root = write_budget_sweep(tmp_path / "sweep", with_totals=True)
    smclm_main(["table", str(root), "--at", "compute/total_sampled_tokens=800"])
    out = capsys.readouterr().out
    assert "**At equal compute: compute/total_sampled_tokens ≤ 800**" in out
    assert "| ctl |" in out and "at update" in out
    md = (root / "table.md").read_text()
    at_update = {ln.split("|")[1].strip(): ln.split("|")[-3].strip() for ln in md.splitlines()
                 if ln.startswith(("| ctl", "| dpg"))}  # fmt: skip
    assert at_update == {"ctl": "8", "dpg": "2"}
    for bad, needle in (
        ("compute/sampled_tokens=5", "unknown budget key 'compute/sampled_tokens'"),
        ("time/total_update_s=abc", "'abc' is not a number"),
        ("compute/total_sampled_tokens=-1", "must be a finite number ≥ 0"),
    ):
        with pytest.raises(SystemExit) as exc:
            smclm_main(["table", str(root), "--at", bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_paper_values_and_method_check_through_the_cli(capsys):
    smclm_main(["table", "--paper", "table10", "--methods", "ctl,dpg"])
    out = capsys.readouterr().out
    assert "| ctl | 0.71 ± 0.02 | 0.64 ± 0.02 | 0.70 ± 0.02 | 0.60 ± 0.01 |" in out
    with pytest.raises(SystemExit):
        smclm_main(["table", "--paper", "table99"])
    assert "no paper result 'table99'; choose one of: fig3, table2" in capsys.readouterr().err
    result = paper_result("table9")
    assert result.variant_of({"method": {"positives": "exact"}}) == "exact"
    assert result.variant_of({"method": {"positives": "sis"}}) == "approx"
    with pytest.raises(UserError, match="no paper numbers for method ppo"):
        from smclm.report.paper import check_methods

        check_methods("table9", ["ctl", "ppo"])


def test_paper_report_from_hand_made_runs_is_detected_and_exact(tmp_path):
    """Runs that record paper.result get the paper column; ours = mean ± 1.96·sd/√n."""
    root = tmp_path / "sweep"
    f = {("ctl", 0): -3.0, ("ctl", 1): -3.4, ("gfn", 0): -2.5}
    for i, ((method, seed), fq) in enumerate(f.items()):
        d = root / str(i)
        d.mkdir(parents=True)
        cfg = {
            "task": {"name": "infilling"},
            "method": {"name": method},
            "model": {"name": "roneneldan/TinyStories-33M"},
            "seed": seed,
            "paper": {"result": "table8", "profile": "cpu", "reductions": ["seed=0,1"],
                      "overrides": []},
        }  # fmt: skip
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        summary = {"bounds/f_q": fq, "bounds/g_q": -1.0, "log_z/estimate": -2.0}
        (d / "summary.json").write_text(json.dumps(summary))
    md, rows = make_table(root)
    assert [r["method"] for r in rows] == ["ctl", "rl", "sixo", "fudge", "dpg", "ppo", "gfn"]
    ctl = rows[0]
    assert ctl["kl_q_sigma"] == pytest.approx(1.2)  # mean(-2 + 3.0, -2 + 3.4)
    assert ctl["kl_q_sigma_ci95"] == pytest.approx(1.96 * 0.2828427 / 2**0.5, rel=1e-5)
    assert ctl["diff_kl_q_sigma"] == pytest.approx(1.2 - 0.47)
    assert rows[1]["n"] == 0 and rows[1]["kl_q_sigma"] is None
    assert "| gfn (not in the paper) |" in md and "Model differs" not in md
    assert "Profile: cpu." in md and "`seed=0,1`" in md
    assert "| ctl | 1.200 ± 0.392 | 0.47 ± 0.10 | +0.730 |" in md
    plain, _ = make_table(root, tmp_path / "plain", paper="none")
    assert "paper" not in plain


def test_slurm_launcher_config_becomes_sbatch_directives(tmp_path, monkeypatch):
    """hydra/launcher=slurm: environment variables and defaults reach submitit's sbatch file
    (partition, time, GPUs, memory, requeue, the signal before the time limit)."""
    submitit = pytest.importorskip("submitit")  # the slurm extra (make install installs it)
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)  # submitit's SLURM executor only checks that srun exists
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SMCLM_SLURM_PARTITION", "gpu")
    monkeypatch.setenv("SMCLM_SLURM_MEM_GB", "64")
    overrides = ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                 "hydra.launcher.gpus_per_node=2"]  # fmt: skip
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    # as the Hydra plugin hands them to submitit
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"],
        slurm_max_num_timeout=params["max_num_timeout"],
    )  # fmt: skip
    executor.update_parameters(
        **{
            k if k in base else f"slurm_{k}": v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout", "_target_")
        }
    )
    sbatch = executor._executor._make_submission_file_text("smclm train", "uid")
    for line in ("--partition=gpu", "--mem=64GB", "--gpus-per-node=2", "--time=600",
                 "--requeue", "--signal=USR2@120"):  # fmt: skip
        assert f"#SBATCH {line}\n" in sbatch
    assert executor._executor.max_num_timeout == 5


@pytest.mark.parametrize(
    "experiment,expect",
    [("infilling_2", "table8"), ("toxicity_classifier", "table2"), ("toy_ctl", None)],
)
def test_paper_result_detected_from_the_runs_experiment(tmp_path, experiment, expect):
    """A sweep made by hand (no paper.* in its config) is a paper setting when its Hydra choices
    name a paper experiment; Tables 9 and 10 share theirs with Tables 2 and 3 and need --paper."""
    from smclm.report.paper import detect_result

    d = tmp_path / "0"
    (d / ".hydra").mkdir(parents=True)
    (d / "config.yaml").write_text(
        yaml.safe_dump({"task": {"name": "x"}, "method": {"name": "ctl"}})
    )
    (d / "summary.json").write_text("{}")
    hydra = {"hydra": {"runtime": {"choices": {"experiment": experiment, "method": "ctl"}}}}
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    assert detect_result(find_runs(tmp_path)) == expect
