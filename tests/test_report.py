"""Tests for smclm.report: the KL table and the plots, on synthetic run directories."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from smclm.report.plot import make_plots, plot_bounds, plot_kl_curves
from smclm.report.table import NoRunsError, find_runs, make_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(d: Path, task: str, method: str, seed: int, summary: dict, rows: list[dict]) -> Path:
    """A run directory in the format train.py writes (config.yaml, metrics.jsonl, summary.json)."""
    d.mkdir(parents=True)
    cfg = {
        "task": {"name": task, "output_len": 4},
        "method": {"name": method, "lr": 1e-4},
        "seed": seed,
        "train": {"updates": 32},
    }
    (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (d / "summary.json").write_text(
        json.dumps({**summary, "run/task": task, "run/method": method, "run/seed": seed}, indent=2)
    )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


# Final metrics of a 2 methods × 2 seeds sweep with no exact log Z.
SWEEP = {
    ("ctl", 0): {"f_q": -3.0, "g_q": -1.5, "est": -2.0},
    ("ctl", 1): {"f_q": -3.4, "g_q": -1.0, "est": -2.2},
    ("dpg", 0): {"f_q": -4.0, "g_q": -1.8, "est": -2.5},
    ("dpg", 1): {"f_q": -3.8, "g_q": -1.9, "est": -1.9},
}
KS = (4, 16, 64)


def bounds_keys(log_z: float, shift: float) -> dict:
    out = {}
    for prefix, width in (("bounds", 1.0), ("bounds_p0", 3.0)):
        for k in KS:
            for kind in ("sis", "smc"):
                gap = width / math.log2(k)
                out[f"{prefix}/k{k}/log_z_lower_{kind}"] = log_z - gap + shift
                out[f"{prefix}/k{k}/log_z_upper_{kind}"] = log_z + gap + shift
                out[f"{prefix}/k{k}/log_z_lower_{kind}_se"] = 0.1
                out[f"{prefix}/k{k}/log_z_upper_{kind}_se"] = 0.1
    return out


def curve_rows(f_q: float, g_q: float, est: float) -> list[dict]:
    rows = []
    for step in (0, 16, 32):
        frac = 1 - step / 32
        rows.append({"step": step, "train/loss": 1.0 + frac} if step else {"step": 0})
        rows.append(
            {
                "step": step,
                "bounds/f_q": f_q - frac,
                "bounds/g_q": g_q + frac,
                "log_z/estimate": est,
                "kl/q_sigma": est - f_q + frac,
                "kl/sigma_q": g_q + frac - est,
            }
        )
    return rows


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "toy" / "2026-01-01_00-00-00"
    for i, ((method, seed), v) in enumerate(SWEEP.items()):
        summary = {
            "bounds/f_q": v["f_q"],
            "bounds/g_q": v["g_q"],
            "log_z/estimate": v["est"],
            "kl/q_sigma": v["est"] - v["f_q"],
            "kl/sigma_q": v["g_q"] - v["est"],
            "train/loss": 0.5,
            **bounds_keys(v["est"], 0.01 * seed),
        }
        write_run(
            root / f"{i}_{method}_seed{seed}",
            "toy",
            method,
            seed,
            summary,
            curve_rows(v["f_q"], v["g_q"], v["est"]),
        )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def ci(values: list[float]) -> float:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    return 1.96 * sd / math.sqrt(len(values))


def test_find_runs(sweep):
    runs = find_runs(sweep)
    assert [(r.method, r.seed) for r in runs] == [("ctl", 0), ("ctl", 1), ("dpg", 0), ("dpg", 1)]
    assert all(r.task == "toy" for r in runs)
    assert len(runs[0].metrics()) == 6


def test_table_median_log_z(sweep, tmp_path):
    out_dir = tmp_path / "out"
    markdown, rows = make_table(sweep, out_dir)
    # log Z: the median over all four runs (both methods) of log_z/estimate
    log_z = statistics.median([-2.0, -2.2, -2.5, -1.9])  # = -2.1
    assert log_z == pytest.approx(-2.1)
    expected = {}
    for method in ("ctl", "dpg"):
        vals = [v for (m, _), v in SWEEP.items() if m == method]
        kq = [log_z - v["f_q"] for v in vals]
        ks = [v["g_q"] - log_z for v in vals]
        expected[method] = (sum(kq) / 2, ci(kq), sum(ks) / 2, ci(ks))
    assert [r["method"] for r in rows] == ["ctl", "dpg"]
    for row in rows:
        kq, kq_ci, ks, ks_ci = expected[row["method"]]
        assert row["n"] == 2 and row["task"] == "toy"
        assert row["log_z"] == pytest.approx(log_z)
        assert row["kl_q_sigma"] == pytest.approx(kq)
        assert row["kl_q_sigma_ci95"] == pytest.approx(kq_ci)
        assert row["kl_sigma_q"] == pytest.approx(ks)
        assert row["kl_sigma_q_ci95"] == pytest.approx(ks_ci)
        assert row["kl_q_sigma_exact"] is None
    # ctl: KL(q‖σ) = mean(0.9, 1.3) = 1.1, ci = 1.96·0.2828/√2 = 0.392
    assert "| ctl | 1.100 ± 0.392 |" in markdown
    assert "exact" not in markdown.split("\n\n", 2)[2]  # no exact-KL columns
    assert (out_dir / "table.md").read_text() == markdown
    csv_rows = list(csv.DictReader(io.StringIO((out_dir / "table.csv").read_text())))
    assert [r["method"] for r in csv_rows] == ["ctl", "dpg"]
    assert float(csv_rows[1]["kl_sigma_q"]) == pytest.approx(expected["dpg"][2])
    assert "kl_q_sigma_exact" not in csv_rows[0]
    # default out_dir is the root
    make_table(sweep)
    assert (sweep / "table.md").exists() and (sweep / "table.csv").exists()


def test_table_md_ends_with_the_command_that_made_it(sweep, tmp_path, monkeypatch, capsys):
    """smclm table's last line of table.md: its arguments as given, shell-quoted, after
    `cd <dir> &&` (from table.md's directory) when a path among them is relative; pasted into a
    shell there, it writes the same table."""
    from smclm.cli import main as smclm_main

    monkeypatch.chdir(tmp_path)
    rel = sweep.relative_to(tmp_path).as_posix()
    args = ["table", rel, "--out", "out [1], it's", "--paper", "none"]
    smclm_main(args)
    out = tmp_path / "out [1], it's"
    md = (out / "table.md").read_text()
    command = f"smclm table {rel} --out 'out [1], it'\"'\"'s' --paper none"
    assert md.endswith(f"| 2 |\n\nMade by `cd .. && {command}` (from this directory).\n")
    assert shlex.split(command) == ["smclm", *args]
    (out / "table.md").unlink()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "-c", f"cd .. && {command}"], cwd=out, env={**os.environ, "PATH": path},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "table.md").read_text() == md
    smclm_main(["table", str(sweep), "--paper", "none"])  # absolute: no working directory
    made_by = f"\n\nMade by `smclm table {shlex.quote(str(sweep))} --paper none`.\n"
    assert (sweep / "table.md").read_text().endswith(made_by)
    monkeypatch.chdir(sweep)
    smclm_main(["table", "."])
    made_by = "\n\nMade by `smclm table .` (in this directory).\n"
    assert (sweep / "table.md").read_text().endswith(made_by)
    capsys.readouterr()
    markdown, _ = make_table(sweep)  # called as a function: no command line to record
    assert "Made by" not in markdown


def test_table_exact_log_z_exact_columns_eval_merge_and_single_seed(tmp_path):
    root = tmp_path / "sweep"
    log_z = -1.25
    runs = {
        ("ctl", 0): (-1.5, -1.0, 0.21, 0.26),
        ("ctl", 1): (-1.7, -0.9, 0.43, 0.36),
        ("rl", 0): (-2.0, -0.5, 0.74, 0.72),
    }
    for i, ((method, seed), (f_q, g_q, eq, es)) in enumerate(runs.items()):
        summary = {
            "bounds/f_q": f_q,
            "bounds/g_q": g_q,
            "log_z/exact": log_z,
            "log_z/estimate": 5.0,
            "kl/q_sigma_exact": eq,
            "kl/sigma_q_exact": es,
        }
        write_run(root / str(i), "toy", method, seed, summary, [])
    # `smclm eval run=<dir>` output: merged into its run (its f_q wins), not a run of its own
    ev = root / "2" / "eval"
    ev.mkdir()
    (ev / "summary.json").write_text(json.dumps({"bounds/f_q": -2.1, "run/checkpoint": "x"}))
    (ev / "config.yaml").write_text((root / "2" / "config.yaml").read_text())
    markdown, rows = make_table(root)
    assert len(find_runs(root)) == 3
    ctl, rl = rows
    assert ctl["log_z_source"] == "exact" and ctl["log_z"] == log_z  # not the median estimate
    assert ctl["kl_q_sigma"] == pytest.approx(((log_z + 1.5) + (log_z + 1.7)) / 2)
    assert ctl["kl_sigma_q"] == pytest.approx(((-1.0 - log_z) + (-0.9 - log_z)) / 2)
    assert ctl["kl_q_sigma_exact"] == pytest.approx(0.32)
    assert ctl["kl_q_sigma_exact_ci95"] == pytest.approx(ci([0.21, 0.43]))
    assert ctl["kl_sigma_q_exact"] == pytest.approx(0.31)
    assert rl["n"] == 1 and rl["kl_q_sigma_ci95"] is None
    assert rl["kl_q_sigma"] == pytest.approx(log_z + 2.1)  # the eval summary's f_q
    assert "KL(q‖σ) exact" in markdown and "KL(σ‖q) exact" in markdown
    assert "| rl | 0.850 | 0.750 | 0.740 | 0.720 | 1 |" in markdown  # n = 1: means only


def test_no_runs(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "summary.json").write_text("{}")  # no config.yaml: not a run
    for fn in (make_table, make_plots):
        with pytest.raises(NoRunsError, match="no runs found under .*summary.json and config.yaml"):
            fn(tmp_path / "empty")
    with pytest.raises(NoRunsError):
        make_table(tmp_path / "does-not-exist")


def test_plots_are_written(sweep):
    paths = make_plots(sweep)
    assert [p.name for p in paths] == ["log_z_bounds.png", "kl_curves.png"]
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not [p for p in sweep.iterdir() if ".tmp" in p.name]


def test_plots_single_run_and_missing_data(tmp_path, caplog):
    run = write_run(
        tmp_path / "run",
        "toy",
        "ctl",
        0,
        {"bounds/f_q": -1.0, "log_z/exact": -0.5},
        [
            {"step": s, "kl/q_sigma_exact": 1.0 / (s + 1), "kl/sigma_q_exact": 2.0 / (s + 1)}
            for s in (0, 4, 8)
        ],
    )
    with caplog.at_level(logging.WARNING, logger="smclm.report.plot"):
        paths = make_plots(run)
    assert [p.name for p in paths] == ["kl_curves.png"]  # no bound metrics: skipped
    assert "skipping log_z_bounds.png" in caplog.text and "evaluator=bounds" in caplog.text
    out = plot_kl_curves(run, tmp_path / "x" / "kl.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    # bounds with a known log Z, one run
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, **bounds_keys(-0.5, 0.0)}))
    out = plot_bounds(run, tmp_path / "b.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
