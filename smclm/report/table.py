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

``--at KEY=N`` (a :class:`Budget`: ``compute/total_<counter>`` or ``time/total_update_s``)
compares methods at equal compute instead of at their final update: each run's metrics are those
of its last evaluation in metrics.jsonl whose running total of KEY is ≤ N (evaluation records
carry the running totals; for older runs the per-update counters are summed up to that step).

When the runs reproduce a paper result (:mod:`smclm.report.paper`), the table is the
reproduction report: the paper's values beside ours.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smclm.errors import UserError

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
# evaluator=sentences (Hu et al. Figure 3); shown when some run of the task has them. The
# generate baselines of an evaluation (sent/<baseline>/<metric>) get rows of their own.
SENT_COLUMNS = (
    ("sent_max_log_lik", "max log-lik", "sent/max_log_lik"),
    ("sent_mean_log_lik", "mean log-lik", "sent/mean_log_lik"),
    ("sent_diversity", "diversity", "sent/diversity"),
    ("sent_mean_len", "length", "sent/mean_len"),
)
_BASELINE_KEY = re.compile(r"^sent/(.+)/max_log_lik$")


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
        """The task's name, with its target temperature when it has one ≠ 1 (task.tau)."""
        name = self._name("task", "run/task")
        node = self.config.get("task")
        tau = node.get("tau") if isinstance(node, dict) else None
        if isinstance(tau, (int, float)) and float(tau) != 1.0:
            return f"{name} (τ={float(tau):g})"
        return name

    @property
    def method(self) -> str:
        return self._name("method", "run/method")

    @property
    def sampler_label(self) -> str:
        """The method, or for an evaluation without a learner (method none) that drew its
        sentences by importance resampling from p₀ (``sent/sampler`` twisted_smc with an
        untrained twist), ``p0_sir_K<K>``: approximate samples of the target σ itself; for one
        with ``task.k_shot`` (task=latent), ``p0_<k>shot``: k-shot prompting of p₀."""
        method = self.method
        if method == "none" and self.final.get("sent/sampler") == "twisted_smc":
            smc = self.config.get("smc")
            k = smc.get("n_particles") if isinstance(smc, dict) else None
            return f"p0_sir_K{k}"
        task = self.config.get("task")
        shots = task.get("k_shot") if isinstance(task, dict) else None
        if method == "none" and isinstance(shots, int) and not isinstance(shots, bool):
            return f"p0_{shots}shot"  # k-shot prompting of p₀ (task.k_shot, task=latent)
        return method

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.final.get("run/seed"))

    def rows_by_step(self) -> dict[int, dict[str, Any]]:
        """metrics.jsonl rows merged per step (an update's row and its evaluation's share one)."""
        by_step: dict[int, dict[str, Any]] = {}
        for row in self.metrics():
            step = row.get("step")
            if isinstance(step, int):
                by_step.setdefault(step, {}).update(row)
        return by_step

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
    for d, run in found.items():  # an eval/ summary without a config of its own
        ev = d / "eval" / "summary.json"
        if not run.eval_summary and ev.is_file():
            try:
                run.eval_summary = _load_json(ev)
            except (OSError, ValueError):
                pass
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


def task_log_z(finals: list[dict[str, Any]]) -> tuple[float | None, str]:
    """The log Z used for every run of one task (given their final metrics), and its source."""
    exact = [f["log_z/exact"] for f in finals if _finite(f.get("log_z/exact"))]
    if exact:
        return float(statistics.median(exact)), "exact"
    est = [f["log_z/estimate"] for f in finals if _finite(f.get("log_z/estimate"))]
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
    for key, _, metric in EXACT_COLUMNS + SENT_COLUMNS:
        out[key] = float(final[metric]) if _finite(final.get(metric)) else None
    return out


def baseline_rows(task: str, finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``generate`` baseline found in the runs' sent/<baseline>/* metrics."""
    names = sorted({m.group(1) for f in finals for k in f if (m := _BASELINE_KEY.match(k))})
    rows = []
    for name in names:
        row: dict[str, Any] = {"task": task, "method": f"{name} (generate)", "log_z": None}
        vals_n = 0
        for key, _, metric in SENT_COLUMNS:
            vals = [
                float(v)
                for f in finals
                if _finite(v := f.get(metric.replace("sent/", f"sent/{name}/", 1)))
            ]
            vals_n = max(vals_n, len(vals))
            row[key], row[f"{key}_ci95"] = mean_ci(vals)
        for key in [c[0] for c in KL_COLUMNS] + [c[0] for c in EXACT_COLUMNS]:
            row[key], row[f"{key}_ci95"] = None, None
        row["n"] = vals_n
        rows.append(row)
    return rows


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
    text = f"{mean:.3f}".replace("-0.000", "0.000")
    return text if ci is None else f"{text} ± {ci:.3f}"


def build_rows(
    runs: list[Run], finals: dict[Path, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One row per task × method with mean and CI half-width of every KL column.

    ``finals`` (run path → metrics) replaces the runs' final metrics, e.g. metrics at a budget;
    runs missing from it are left out."""
    if finals is None:
        finals = {r.path: r.final for r in runs}
    tasks: dict[str, list[Run]] = {}
    for r in runs:
        if r.path in finals:
            tasks.setdefault(r.task, []).append(r)
    rows = []
    for task in sorted(tasks):
        task_runs = tasks[task]
        log_z, source = task_log_z([finals[r.path] for r in task_runs])
        methods: dict[str, list[Run]] = {}
        for r in task_runs:
            methods.setdefault(r.sampler_label, []).append(r)
        for method in sorted(methods, key=_method_rank):
            kls = [run_kls(finals[r.path], log_z) for r in methods[method]]
            row: dict[str, Any] = {
                "task": task,
                "method": method,
                "n": len(kls),
                "log_z": log_z,
                "log_z_source": source,
            }
            steps = [
                finals[r.path]["at/step"] for r in methods[method] if "at/step" in finals[r.path]
            ]
            if steps:
                row["at_step"] = statistics.fmean(steps)
            for key in [c[0] for c in KL_COLUMNS + EXACT_COLUMNS + SENT_COLUMNS]:
                vals = [v for k in kls if (v := k[key]) is not None]
                row[key], row[f"{key}_ci95"] = mean_ci(vals)
            rows.append(row)
        for row in baseline_rows(task, [finals[r.path] for r in task_runs]):
            row["log_z"], row["log_z_source"] = log_z, source
            rows.append(row)
    return rows


def _has_exact(rows: list[dict[str, Any]]) -> bool:
    return any(row[c[0]] is not None for row in rows for c in EXACT_COLUMNS)


def _has_sent(rows: list[dict[str, Any]]) -> bool:
    return any(row.get(c[0]) is not None for row in rows for c in SENT_COLUMNS)


def render_markdown(rows: list[dict[str, Any]], budget: Budget | None = None) -> str:
    parts = []
    if budget is not None:
        parts.append(
            f"**At equal compute: {budget}** — each run's metrics are those of its last "
            "evaluation within the budget.\n"
        )
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        cols = list(KL_COLUMNS)
        if _has_exact(task_rows):
            cols += [(c[0], c[1]) for c in EXACT_COLUMNS]
        if _has_sent(task_rows):
            cols += [(c[0], c[1]) for c in SENT_COLUMNS]
        at = any("at_step" in row for row in task_rows)
        log_z = task_rows[0]["log_z"]
        lz = "unknown" if log_z is None else f"{log_z:.4f}"
        parts.append(
            f"## {task}\n\nlog Z = {lz} ({task_rows[0]['log_z_source']}); "
            "cells: mean ± 1.96·sd/√n over seeds\n"
        )
        header = [c[1] for c in cols] + (["at update"] if at else []) + ["n"]
        parts.append("| method | " + " | ".join(header) + " |")
        parts.append("|---|" + "---|" * len(header))
        for row in task_rows:
            cells = [_fmt(row[key], row[f"{key}_ci95"]) for key, _ in cols]
            if at:
                cells.append(f"{row['at_step']:g}" if "at_step" in row else "–")
            parts.append(f"| {row['method']} | " + " | ".join(cells) + f" | {row['n']} |")
        parts.append("")
    return "\n".join(parts)


def render_csv(rows: list[dict[str, Any]], keys: list[str] | None = None) -> str:
    if keys is None:
        keys = ["task", "method", "n", "log_z", "log_z_source"]
        cols = [c[0] for c in KL_COLUMNS]
        cols += [c[0] for c in EXACT_COLUMNS] if _has_exact(rows) else []
        cols += [c[0] for c in SENT_COLUMNS] if _has_sent(rows) else []
        for c in cols:
            keys += [c, f"{c}_ci95"]
        if any("at_step" in row for row in rows):
            keys.append("at_step")
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


# -- equal compute ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """A compute budget: ``key`` is a running total (``compute/total_<counter>`` or
    ``time/total_update_s``), ``limit`` its largest allowed value."""

    key: str
    limit: float

    def __str__(self) -> str:
        return f"{self.key} ≤ {self.limit:g}"

    @property
    def per_update_key(self) -> str:
        """The per-update counter whose running sum the key is (``compute/total_x`` → ``compute/x``)."""
        if self.key == "time/total_update_s":
            return "time/update_s"
        return "compute/" + self.key.removeprefix("compute/total_")


def parse_budget(text: str) -> Budget:
    """``compute/total_sampled_tokens=1e6`` or ``time/total_update_s=3600`` → Budget."""
    key, _, value = text.partition("=")
    fix = (
        "give --at compute/total_<counter>=N (e.g. compute/total_sampled_tokens=100000) "
        "or --at time/total_update_s=S"
    )
    if not (key.startswith("compute/total_") and len(key) > 14 or key == "time/total_update_s"):
        raise UserError(f"--at {text}: unknown budget key '{key}'; {fix}")
    try:
        limit = float(value)
    except ValueError:
        raise UserError(f"--at {text}: '{value}' is not a number; {fix}") from None
    if not math.isfinite(limit) or limit < 0:
        raise UserError(f"--at {text}: the budget must be a finite number ≥ 0; {fix}")
    return Budget(key, limit)


EVAL_PREFIXES = ("kl/", "bounds/", "bounds_p0/", "log_z/")


def _is_evaluation(row: dict[str, Any]) -> bool:
    return "time/eval_s" in row or any(k.startswith(EVAL_PREFIXES) for k in row)


def metrics_at(run: Run, budget: Budget) -> dict[str, Any] | None:
    """The run's metrics at its last evaluation whose running total of ``budget.key`` is within
    the budget, with ``at/step`` and ``at/total``; None when no evaluation is within it.

    An evaluation record's own running total is used; a record without it (older runs, or the
    update-0 evaluation before anything was counted) uses the sum of the per-update counter over
    the updates up to its step (the update of step s is logged at step s, before its evaluation).
    """
    chosen = None
    running = 0.0
    for step, row in sorted(run.rows_by_step().items()):
        inc = row.get(budget.per_update_key)
        if step > 0 and _finite(inc):
            running += float(inc)
        if not _is_evaluation(row):
            continue
        total = float(row[budget.key]) if _finite(row.get(budget.key)) else running
        if total <= budget.limit:
            chosen = {**row, "at/step": step, "at/total": total}
    return chosen


# -- the command --------------------------------------------------------------------------------


def make_table(
    root: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    at: Budget | str | None = None,
    paper: str | None = None,
    made_by: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Write table.md and table.csv into out_dir (default: root); return (markdown, rows).

    ``at``: compare at a compute budget (see :func:`metrics_at`). ``paper``: the paper result to
    report against (``None``: detected from the runs; ``"none"``: a plain table). ``made_by``: a
    final line of table.md, the command that made it (``smclm table`` writes its own, see
    :func:`made_by_line`).
    """
    from smclm.report import paper as paper_mod

    runs = require_runs(root)
    budget = parse_budget(at) if isinstance(at, str) else at
    if budget is None:
        finals = {r.path: r.final for r in runs}
    else:
        finals = {r.path: f for r in runs if (f := metrics_at(r, budget)) is not None}
        if not finals:
            raise UserError(
                f"no run under {root} has an evaluation within {budget}; raise the budget"
            )
    name = paper_mod.detect_result(runs) if paper is None else (None if paper == "none" else paper)
    result = paper_mod.paper_result(name) if name else None
    paper_runs = [r for r in runs if result and r.task == result.task and r.path in finals]
    if result is not None and paper_runs:
        log_z, source = task_log_z([finals[r.path] for r in paper_runs])
        rows = paper_mod.build_paper_rows(
            result, paper_runs, [finals[r.path] for r in paper_runs], log_z
        )
        for row in rows:
            row["log_z"], row["log_z_source"], row["paper_result"] = log_z, source, result.name
        markdown = paper_mod.render_paper_markdown(
            result, rows, paper_runs, log_z, source, str(budget) if budget else None
        )
        keys = ["paper_result", "task", "method", "variant", "n", "log_z", "log_z_source"]
        keys += paper_mod.csv_keys(result)
        if any("at_step" in row for row in rows):
            keys.append("at_step")
        csv_text = render_csv(rows, keys)
        others = [r for r in runs if r not in paper_runs]
        if others:  # runs of another task in the same directory: a plain table below
            markdown += "\n" + render_markdown(build_rows(others, finals), budget)
    else:
        rows = build_rows(runs, finals)
        markdown = render_markdown(rows, budget)
        csv_text = render_csv(rows)
    skipped = len(runs) - len(finals)
    if skipped:
        markdown += f"\n{skipped} run(s) left out: no evaluation within {budget}.\n"
    if made_by:
        markdown = markdown.rstrip("\n") + f"\n\n{made_by}\n"
    out = Path(out_dir) if out_dir is not None else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "table.md", markdown)
    _write_atomic(out / "table.csv", csv_text)
    return markdown, rows


def _code(text: str) -> str:  # inline Markdown code, also when the text has a backtick
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def made_by_line(argv: list[str], paths: list[str | None], out_dir: str | os.PathLike) -> str:
    """table.md's last line: ``smclm table`` with its arguments as given, shell-quoted (it runs
    again when pasted), preceded by ``cd <dir> &&`` (the working directory, relative to table.md's
    own directory out_dir) when one of ``paths`` (the arguments that are paths) is relative."""
    command = shlex.join(["smclm", "table", *argv])
    if any(p and not os.path.isabs(p) for p in paths):
        where = os.path.relpath(Path.cwd().resolve(), Path(out_dir).resolve())
        if where != ".":
            return (
                f"Made by {_code(f'cd {shlex.quote(where)} && {command}')} (from this directory)."
            )
        return f"Made by {_code(command)} (in this directory)."
    return f"Made by {_code(command)}."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2 (via the CLI), not usage + msg
        raise UserError(f"smclm table: {message}; see smclm table --help")


def table_command(argv: list[str]) -> None:
    """``smclm table``'s arguments (see ``smclm table --help``)."""
    parser = _Parser(
        prog="smclm table",
        description="KL table (table.md, table.csv) of the runs under a sweep directory; the "
        "reproduction report beside the paper's numbers when the runs reproduce a paper result.",
    )
    parser.add_argument("dir", nargs="?", help="a run or sweep directory")
    parser.add_argument(
        "--at",
        metavar="KEY=N",
        help="compare at equal compute: each run at its last evaluation with KEY ≤ N, KEY one of "
        "compute/total_<counter> (e.g. compute/total_sampled_tokens) or time/total_update_s",
    )
    parser.add_argument(
        "--paper",
        metavar="RESULT",
        help="the paper result to compare with (fig3, table2, table3, table4, table8, table9, "
        "table10; Hu et al.'s gfn_table4; default: detected from the runs; 'none': a plain "
        "table). Without a directory: print the paper's numbers",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="where to write table.md and table.csv (default: the dir)"
    )
    parser.add_argument(
        "--methods",
        metavar="M1,M2",
        help="with --paper and no directory: refuse (exit 2) a method the paper's result has no "
        "numbers for",
    )
    args = parser.parse_args(argv)
    from smclm.report import paper as paper_mod

    if args.dir is None:
        if not args.paper or args.paper == "none":
            raise UserError("usage: smclm table <run or sweep directory> [--at KEY=N] [--paper R]")
        if args.methods:
            paper_mod.check_methods(args.paper, [m for m in args.methods.split(",") if m])
        print(paper_mod.render_paper_values(paper_mod.paper_result(args.paper)))
        return
    root = Path(args.dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory; give a run or sweep directory")
    out = Path(args.out) if args.out else root
    made_by = made_by_line(argv, [args.dir, args.out], out)
    markdown, _ = make_table(root, args.out, args.at, args.paper, made_by=made_by)
    print(markdown)
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")
