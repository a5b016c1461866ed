"""Plots from run directories (paper-spec §7.3): log-Z bounds vs particles, KL vs updates.

* ``plot_bounds``: per task × method panel, the mean log-Z bounds against log₂ K for
  {lower, upper} × {SIS, SMC} × {twisted, p₀} proposals, from the final metrics' keys
  ``bounds[_p0]/k{K}/log_z_{lower,upper}_{sis,smc}`` (and ``_se``), with ±1.96·se bands; log Z is
  a horizontal line when exact (``log_z/exact``). With several seeds a point is the mean over
  seeds and its se is √(Σ se²)/n.
* ``plot_kl_curves``: KL(q‖σ) and KL(σ‖q) against the number of updates (``step``) from
  metrics.jsonl, one line per method (mean over seeds, ±1.96·sd/√n band when n ≥ 2), with the
  exact KLs dashed when logged. Estimated KLs use the task's consistent log Z (as the table does)
  with each row's ``bounds/f_q`` / ``bounds/g_q``, else the row's own ``kl/q_sigma`` /
  ``kl/sigma_q``.
* ``plot_sentences`` (``fig3_sentences.png``, only when some run has ``sent/*`` metrics:
  ``evaluator=sentences``): Figure 3 of Hu et al. (ICLR 2024), diversity (x) against the max
  log-likelihood over a prompt's samples (y), one labelled point per (method, τ): each run's
  ``sent/diversity`` and ``sent/max_log_lik`` (its method's name and ``task.tau``; p₀ for a run
  without a method, e.g. ``smclm eval`` without ``run=``), and each baseline logged by such an
  evaluation (``sent/<baseline>/…``) as its own point. Seeds of one point are averaged. The paper
  gives Figure 3 as a plot only: no paper numbers are drawn.

Figures are drawn with matplotlib's Agg canvas (no display, no global backend change).
"""

from __future__ import annotations

import logging
import math
import os
import re
import statistics
from pathlib import Path

from smclm.report.table import Run, _finite, require_runs, run_kls, task_log_z

log = logging.getLogger(__name__)

BOUND_KEY = re.compile(r"^(bounds|bounds_p0)/k(\d+)/log_z_(lower|upper)_(sis|smc)$")
CURVE_STYLE = {  # (prefix, method) -> colour; lower bounds solid, upper dashed
    ("bounds", "sis"): "tab:blue",
    ("bounds", "smc"): "tab:orange",
    ("bounds_p0", "sis"): "tab:green",
    ("bounds_p0", "smc"): "tab:red",
}
PROPOSAL_LABEL = {"bounds": "q^twist", "bounds_p0": "p₀"}


class NoPlotDataError(ValueError):
    """The runs have no data for this plot."""


def _figure(n_panels: int, ncols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out)
    return out


def _groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    out: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        out.setdefault((r.task, r.method), []).append(r)
    return out


# -- log Z bounds vs K --------------------------------------------------------------------------


def bounds_curves(runs: list[Run]) -> dict[tuple[str, str, str], dict[int, tuple[float, float]]]:
    """{(prefix, lower|upper, sis|smc): {K: (mean, se)}} over runs (mean over seeds)."""
    acc: dict[tuple[str, str, str], dict[int, list[tuple[float, float]]]] = {}
    for r in runs:
        final = r.final
        for key, val in final.items():
            m = BOUND_KEY.match(key)
            if m is None or not isinstance(val, (int, float)) or not _finite(val):
                continue
            prefix, k, side, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            se = final.get(f"{key}_se")
            acc.setdefault((prefix, side, kind), {}).setdefault(k, []).append(
                (float(val), float(se) if isinstance(se, (int, float)) and _finite(se) else 0.0)
            )
    out: dict[tuple[str, str, str], dict[int, tuple[float, float]]] = {}
    for curve, by_k in acc.items():
        out[curve] = {}
        for k, vals in sorted(by_k.items()):
            n = len(vals)
            mean = sum(v for v, _ in vals) / n
            se = math.sqrt(sum(s * s for _, s in vals)) / n
            out[curve][k] = (mean, se)
    return out


def plot_bounds(root: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """log Z bounds vs log₂ K, one panel per task × method. Raises NoPlotDataError if absent."""
    groups = _groups(require_runs(root))
    panels = [(key, runs, bounds_curves(runs)) for key, runs in groups.items()]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise NoPlotDataError(
            f"no log-Z bound metrics (bounds*/k<K>/log_z_*) in the runs under {root}; "
            "evaluate with evaluator=bounds"
        )
    fig, axes = _figure(len(panels), min(3, len(panels)))
    for ax, ((task, method), runs, curves) in zip(axes, panels):
        for (prefix, side, kind), by_k in sorted(curves.items()):
            ks = sorted(by_k)
            x = [math.log2(k) for k in ks]
            y = [by_k[k][0] for k in ks]
            half = [1.96 * by_k[k][1] for k in ks]
            colour = CURVE_STYLE[(prefix, kind)]
            label = f"{kind.upper()} {side} ({PROPOSAL_LABEL[prefix]})"
            ax.plot(
                x,
                y,
                color=colour,
                ls="-" if side == "lower" else "--",
                marker="o" if side == "lower" else "v",
                ms=4,
                label=label,
            )
            ax.fill_between(
                x,
                [a - h for a, h in zip(y, half)],
                [a + h for a, h in zip(y, half)],
                color=colour,
                alpha=0.15,
                lw=0,
            )
        exact = [r.final["log_z/exact"] for r in runs if _finite(r.final.get("log_z/exact"))]
        if exact:
            ax.axhline(statistics.median(exact), color="black", ls=":", lw=1.2, label="log Z")
        ax.set_title(f"{task} / {method} (n={len(runs)})")
        ax.set_xlabel("log₂ K (particles)")
        ax.set_ylabel("log Z bound")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, out_path)


# -- KL vs updates ------------------------------------------------------------------------------


CURVE_KEYS = (  # (panel, key in run_kls, exact?)
    ("KL(q‖σ)", "kl_q_sigma", False),
    ("KL(q‖σ)", "kl_q_sigma_exact", True),
    ("KL(σ‖q)", "kl_sigma_q", False),
    ("KL(σ‖q)", "kl_sigma_q_exact", True),
)


def kl_curves(
    runs: list[Run], log_z: float | None, label=lambda r: r.method
) -> dict[str, dict[str, dict[int, list[float]]]]:
    """{label: {curve key: {step: [value per seed]}}} for the runs of one task; the label is the
    method (with the variant, e.g. exact/approx positives, for a paper result that has them)."""
    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in runs:
        for step, row in sorted(r.rows_by_step().items()):
            kls = run_kls(row, log_z)
            for _, key, _ in CURVE_KEYS:
                val = kls[key]
                if val is not None:
                    by_step = out.setdefault(label(r), {}).setdefault(key, {})
                    by_step.setdefault(step, []).append(val)
    return out


def _paper_of(runs: list[Run]):
    """The paper result these runs reproduce, or None (see smclm.report.paper)."""
    from smclm.errors import UserError
    from smclm.report import paper

    try:
        name = paper.detect_result(runs)
        return paper.paper_result(name) if name else None
    except UserError:
        return None


def plot_kl_curves(root: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """KL(q‖σ) and KL(σ‖q) vs updates, one row of two panels per task. When the runs reproduce a
    paper result, the paper's final value (mean ± 95% CI) is a star at the last update."""
    runs = require_runs(root)
    result = _paper_of(runs)
    variants = result is not None and len(result.variants) > 1

    def label(r: Run) -> str:
        return f"{r.method} {result.variant_of(r.config)}" if variants else r.method

    tasks: dict[str, list[Run]] = {}
    for r in runs:
        tasks.setdefault(r.task, []).append(r)
    data = {}
    for task, task_runs in sorted(tasks.items()):
        curves = kl_curves(task_runs, task_log_z([r.final for r in task_runs])[0], label)
        if curves:
            data[task] = curves
    if not data:
        raise NoPlotDataError(
            f"no KL metrics (kl/* or bounds/f_q, bounds/g_q) in metrics.jsonl of the runs under "
            f"{root}; train with an evaluator (evaluator=exact or bounds)"
        )
    fig, axes = _figure(2 * len(data), 2)
    methods = sorted({m for curves in data.values() for m in curves})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for row, (task, curves) in enumerate(data.items()):
        panel_axes = {"KL(q‖σ)": axes[2 * row], "KL(σ‖q)": axes[2 * row + 1]}
        for method, by_key in curves.items():
            for panel, key, exact in CURVE_KEYS:
                if key not in by_key:
                    continue
                ax = panel_axes[panel]
                steps = sorted(by_key[key])
                vals = [by_key[key][s] for s in steps]
                mean = [statistics.fmean(v) for v in vals]
                half = [
                    1.96 * statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
                    for v in vals
                ]
                ax.plot(
                    steps,
                    mean,
                    color=colours[method],
                    ls="--" if exact else "-",
                    marker="." if len(steps) < 30 else None,
                    label=f"{method}{' (exact)' if exact else ''}",
                )
                if any(h > 0 for h in half):
                    ax.fill_between(
                        steps,
                        [m - h for m, h in zip(mean, half)],
                        [m + h for m, h in zip(mean, half)],
                        color=colours[method],
                        alpha=0.15,
                        lw=0,
                    )
        if result is not None and result.task == task:
            last = max(s for by_key in curves.values() for v in by_key.values() for s in v)
            for name in curves:
                method, _, variant = name.partition(" ")
                paper_vals = result.values.get(method, {}).get(variant, {})
                for panel, key in (("KL(q‖σ)", "kl_q_sigma"), ("KL(σ‖q)", "kl_sigma_q")):
                    if key in paper_vals:
                        mean, ci = paper_vals[key]
                        panel_axes[panel].errorbar(
                            [last], [mean], yerr=[ci], fmt="*", ms=9, capsize=3,
                            color=colours[name], label=f"{name} (paper, its final update)",
                        )  # fmt: skip
        for panel, ax in panel_axes.items():
            ax.set_title(f"{task}: {panel}")
            ax.set_xlabel("updates")
            ax.set_ylabel(panel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="best")
    return _save(fig, out_path)


# -- Figure 3 of Hu et al.: diversity vs max log-likelihood ------------------------------------

SENT_KEY = re.compile(r"^sent/(?:([^/]+)/)?(max_log_lik|diversity)$")
METHOD_LABEL = {"none": "p₀", "ctl": "ctl (twisted SMC)"}


def _tau_text(tau: object) -> str:
    return f" τ={float(tau):g}" if isinstance(tau, (int, float)) and _finite(tau) else ""


def sentence_points(runs: list[Run]) -> dict[str, tuple[float, float, int]]:
    """{label: (mean diversity, mean max log-likelihood, runs averaged)}: one point per
    (method, τ) from each run's ``sent/*`` and per baseline from ``sent/<baseline>/*``."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        final = r.final
        task_cfg = r.config.get("task")
        task = task_cfg if isinstance(task_cfg, dict) else {}
        sources: dict[str | None, dict[str, float]] = {}
        for key, val in final.items():
            m = SENT_KEY.match(key)
            if m and isinstance(val, (int, float)) and _finite(val):
                sources.setdefault(m.group(1), {})[m.group(2)] = float(val)
        for baseline, vals in sources.items():
            if len(vals) < 2:
                continue
            if baseline is None:
                method = r.sampler_label
                label = METHOD_LABEL.get(method, method) + _tau_text(task.get("tau"))
            else:
                label = baseline.split("_tau")[0] + _tau_text(final.get(f"sent/{baseline}/tau"))
            acc.setdefault(label, []).append((vals["diversity"], vals["max_log_lik"]))
    return {
        label: (statistics.fmean(d for d, _ in v), statistics.fmean(y for _, y in v), len(v))
        for label, v in acc.items()
    }


def plot_sentences(root: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Hu et al.'s Figure 3 from the runs' ``sent/*`` metrics (module docstring)."""
    points = sentence_points(require_runs(root))
    if not points:
        raise NoPlotDataError(
            f"no sentence metrics (sent/diversity, sent/max_log_lik) in the runs under {root}; "
            "evaluate with evaluator=sentences"
        )
    fig, axes = _figure(1, 1, width=6.4, height=4.8)
    ax = axes[0]
    families = sorted({label.split(" ")[0] for label in points})
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for label, (x, y, n) in sorted(points.items()):
        family = label.split(" ")[0]
        ax.scatter([x], [y], color=colours[family], s=36, zorder=3)
        ax.annotate(
            label + (f" (n={n})" if n > 1 else ""),
            (x, y),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.set_xlabel("diversity (1 − mean pairwise cosine similarity)")
    ax.set_ylabel("max log-likelihood over a prompt's samples")
    ax.set_title("sentence continuation (Hu et al. Fig. 3; no paper numbers)")
    ax.grid(alpha=0.3)
    return _save(fig, out_path)


def _has_sentences(root: str | os.PathLike) -> bool:
    return any(k.startswith("sent/") for r in require_runs(root) for k in r.final)


def make_plots(root: str | os.PathLike) -> list[Path]:
    """Write log_z_bounds.png and kl_curves.png into root (and fig3_sentences.png when runs have
    ``sent/*`` metrics); skip (with a warning) one without data.

    Raises NoRunsError when there are no runs under root at all.
    """
    require_runs(root)
    written = []
    plots = [(plot_bounds, "log_z_bounds.png"), (plot_kl_curves, "kl_curves.png")]
    if _has_sentences(root):
        plots.append((plot_sentences, "fig3_sentences.png"))
    for fn, name in plots:
        try:
            written.append(fn(root, Path(root) / name))
        except NoPlotDataError as err:
            log.warning("skipping %s: %s", name, err)
    return written
