"""The KL table (paper-spec §7.2) from run directories: ``table.md`` and ``table.csv``.

A run is a directory holding ``summary.json`` (final flat metrics) and ``config.yaml`` (the
resolved config; ``.hydra/config.yaml`` is accepted too). Sweeps are scanned recursively. A run's
``eval/`` subdirectory written by ``smclm eval run=<dir>`` is not a separate run: its summary is
merged into the run's (its keys win).

Runs are grouped by task × method (rows = methods, one table per task). log Z is taken
consistently within a task: ``log_z/exact`` when the runs have it, else the median over all the
task's runs (all methods and seeds) of ``log_z/estimate``. Then per run

    KL(q‖σ) = log Z − bounds/f_q        KL(σ‖q) = bounds/g_q − log Z

(a run without f_q / g_q falls back to its own ``kl/q_sigma`` / ``kl/sigma_q``). Each cell is
``mean ± 1.96·sd/√n`` over seeds (sd with ddof=1; just the mean when n = 1). When runs have the
exact KLs (``kl/q_sigma_exact``, ``kl/sigma_q_exact``) these get their own columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHOD_ORDER = ("ctl", "rl", "sixo", "fudge", "dpg", "ppo", "gfn", "none")

# (row key, markdown header[, metric key])
KL_COLUMNS = (
    ("kl_q_sigma", "KL(q‖σ)"),
    ("kl_sigma_q", "KL(σ‖q)"),
)
EXACT_COLUMNS = (
    ("kl_q_sigma_exact", "KL(q‖σ) exact", "kl/q_sigma_exact"),
    ("kl_sigma_q_exact", "KL(σ‖q) exact", "kl/sigma_q_exact"),
)


class NoRunsError(ValueError):
    """No run directories under the given root."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(
            f"no runs found under {root} (looked for directories with summary.json and "
            "config.yaml); point smclm table at a run or sweep directory"
        )


@dataclass
class Run:
    """One run directory: its resolved config and final metrics (eval/ summary merged in)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    eval_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """summary.json with the eval/ summary's keys on top."""
        return {**self.summary, **self.eval_summary}

    def _name(self, group: str, run_key: str) -> str:
        node = self.config.get(group)
        if isinstance(node, dict) and node.get("name") is not None:
            return str(node["name"])
        return str(self.final.get(run_key, "?"))

    @property
    def task(self) -> str:
        return self._name("task", "run/task")

    @property
    def method(self) -> str:
        return self._name("method", "run/method")

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.final.get("run/seed"))

    def metrics(self) -> list[dict[str, Any]]:
        """Rows of metrics.jsonl (empty when absent; a torn last line is skipped)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows


def _config_path(d: Path) -> Path | None:
    for p in (d / "config.yaml", d / ".hydra" / "config.yaml"):
        if p.is_file():
            return p
    return None


def _load_json(path: Path) -> dict[str, Any]:
    obj = json.loads(path.read_text())
    return obj if isinstance(obj, dict) else {}


def find_runs(root: str | os.PathLike) -> list[Run]:
    """Every run directory under root (root itself included), sorted by task, method, seed."""
    root = Path(root)
    found: dict[Path, Run] = {}
    if not root.is_dir():
        return []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        d = Path(dirpath)
        cfg_path = _config_path(d)
        if "summary.json" not in filenames or cfg_path is None:
            continue
        try:
            config = yaml.safe_load(cfg_path.read_text()) or {}
            summary = _load_json(d / "summary.json")
        except (OSError, ValueError, yaml.YAMLError):
            continue  # a run being written, or not a run
        found[d] = Run(d, config if isinstance(config, dict) else {}, summary)
    for d in list(found):  # `smclm eval run=<dir>` writes <dir>/eval/: fold it into its run
        if d.name == "eval" and d.parent in found:
            found[d.parent].eval_summary = found.pop(d).summary
    return sorted(
        found.values(), key=lambda r: (r.task, _method_rank(r.method), str(r.seed), str(r.path))
    )


def require_runs(root: str | os.PathLike) -> list[Run]:
    runs = find_runs(root)
    if not runs:
        raise NoRunsError(root)
    return runs


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def task_log_z(runs: list[Run]) -> tuple[float | None, str]:
    """The log Z used for every run of one task, and where it came from."""
    exact = [r.final["log_z/exact"] for r in runs if _finite(r.final.get("log_z/exact"))]
    if exact:
        return float(statistics.median(exact)), "exact"
    est = [r.final["log_z/estimate"] for r in runs if _finite(r.final.get("log_z/estimate"))]
    if est:
        return float(statistics.median(est)), f"median of {len(est)} runs' log_z/estimate"
    return None, "unknown"


def run_kls(final: dict[str, Any], log_z: float | None) -> dict[str, float | None]:
    """KL(q‖σ) and KL(σ‖q) of one run with the task's log Z (see the module docstring)."""
    out: dict[str, float | None] = {}
    for key, fq_key, fallback, sign in (
        ("kl_q_sigma", "bounds/f_q", "kl/q_sigma", -1.0),
        ("kl_sigma_q", "bounds/g_q", "kl/sigma_q", 1.0),
    ):
        val, fb = final.get(fq_key), final.get(fallback)
        if log_z is not None and isinstance(val, (int, float)) and _finite(val):
            out[key] = sign * (float(val) - log_z)
        elif isinstance(fb, (int, float)) and _finite(fb):
            out[key] = float(fb)
        else:
            out[key] = None
    for key, _, metric in EXACT_COLUMNS:
        out[key] = float(final[metric]) if _finite(final.get(metric)) else None
    return out


def mean_ci(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and 1.96·sd(ddof=1)/√n; the half-width is None when n < 2."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def _fmt(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" if ci is None else f"{mean:.3f} ± {ci:.3f}"


def build_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per task × method with mean and CI half-width of every KL column."""
    tasks: dict[str, list[Run]] = {}
    for r in runs:
        tasks.setdefault(r.task, []).append(r)
    rows = []
    for task in sorted(tasks):
        task_runs = tasks[task]
        log_z, source = task_log_z(task_runs)
        methods: dict[str, list[Run]] = {}
        for r in task_runs:
            methods.setdefault(r.method, []).append(r)
        for method in sorted(methods, key=_method_rank):
            kls = [run_kls(r.final, log_z) for r in methods[method]]
            row: dict[str, Any] = {
                "task": task,
                "method": method,
                "n": len(kls),
                "log_z": log_z,
                "log_z_source": source,
            }
            for key in [c[0] for c in KL_COLUMNS] + [c[0] for c in EXACT_COLUMNS]:
                vals = [v for k in kls if (v := k[key]) is not None]
                row[key], row[f"{key}_ci95"] = mean_ci(vals)
            rows.append(row)
    return rows


def _has_exact(rows: list[dict[str, Any]]) -> bool:
    return any(row[c[0]] is not None for row in rows for c in EXACT_COLUMNS)


def render_markdown(rows: list[dict[str, Any]]) -> str:
    parts = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        cols = list(KL_COLUMNS)
        if _has_exact(task_rows):
            cols += [(c[0], c[1]) for c in EXACT_COLUMNS]
        log_z = task_rows[0]["log_z"]
        lz = "unknown" if log_z is None else f"{log_z:.4f}"
        parts.append(
            f"## {task}\n\nlog Z = {lz} ({task_rows[0]['log_z_source']}); "
            "cells: mean ± 1.96·sd/√n over seeds\n"
        )
        parts.append("| method | " + " | ".join(c[1] for c in cols) + " | n |")
        parts.append("|---|" + "---|" * len(cols) + "---|")
        for row in task_rows:
            cells = [_fmt(row[key], row[f"{key}_ci95"]) for key, _ in cols]
            parts.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['n']} |")
        parts.append("")
    return "\n".join(parts)


def render_csv(rows: list[dict[str, Any]]) -> str:
    keys = ["task", "method", "n", "log_z", "log_z_source"]
    cols = [c[0] for c in KL_COLUMNS] + ([c[0] for c in EXACT_COLUMNS] if _has_exact(rows) else [])
    for c in cols:
        keys += [c, f"{c}_ci95"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in keys})
    return buf.getvalue()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_table(
    root: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> tuple[str, list[dict[str, Any]]]:
    """Write table.md and table.csv into out_dir (default: root); return (markdown, rows)."""
    runs = require_runs(root)
    rows = build_rows(runs)
    markdown = render_markdown(rows)
    out = Path(out_dir) if out_dir is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "table.md", markdown)
    _write_atomic(out / "table.csv", render_csv(rows))
    return markdown, rows
