"""The reproduction report: our KLs (or a result's own metrics) beside the paper's, per method.

The paper's numbers are in ``paper_results.yaml`` beside this file (one entry per paper result,
with its citation; results of other papers, e.g. Hu et al.'s GFlowNet paper, under
``other_papers`` with their own citation); nothing here hard-codes a number. A result compares
the two KL directions unless it names its own ``metrics`` (summary keys such as
``arith/acc_3op``, each with a label and a scale, e.g. 100 for a percentage). A sweep is a
paper setting when its runs record ``paper.result`` (scripts/paper/*.sh pass
``+paper.result=<name>``, with the profile and its reductions), when ``smclm table --paper
<name>`` says so, or when the runs' Hydra choices name an experiment that exactly one
non-ablation result uses (e.g. ``experiment=infilling_2`` → Table 8).

Rows are the paper's methods (then any other method the sweep ran, with no paper value; a
result's ``extra_rows`` name such rows, e.g. methods beyond the paper); each KL cell is our
mean ± 1.96·sd/√n over seeds with the task's consistent log Z (as in :mod:`smclm.report.table`),
beside the paper's mean ± 95% CI (a result without the paper's CIs shows its means only) and
the difference ours − paper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from smclm.errors import UserError

KL_KEYS = (("kl_q_sigma", "KL(q‖σ)"), ("kl_sigma_q", "KL(σ‖q)"))


@dataclass(frozen=True)
class Metric:
    """One compared column: ``key`` names it in rows and table.csv; ``source`` is the summary
    key it reads (None: a KL direction, from :func:`smclm.report.table.run_kls`), times
    ``scale``; cells show ``digits`` decimals."""

    key: str
    label: str
    source: str | None = None
    scale: float = 1.0
    digits: int = 3


KL_METRICS = tuple(Metric(key, label) for key, label in KL_KEYS)


def _metric_key(source: str) -> str:  # arith/acc_3op -> arith_acc_3op (a CSV column name)
    return re.sub(r"[^0-9A-Za-z]+", "_", source).strip("_")


@dataclass(frozen=True)
class PaperResult:
    """One paper table or figure: where its runs come from and the paper's values."""

    name: str
    title: str
    experiment: str
    task: str
    model: str
    classifier: str | None
    settings: str
    note: str | None
    log_z: float | None
    ablation: bool
    variants: dict[str, dict[str, Any]]  # variant -> {config key: value}; "" = no variants
    values: dict[
        str, dict[str, dict[str, list[float | None]]]
    ]  # method -> variant -> key -> [m, ci]
    citation: str = ""
    metrics: tuple[Metric, ...] = KL_METRICS
    paper_values: str = "mean ± 95% CI over 5 seeds"  # what the paper's cells are
    units: str = "KL in nats, single-sample q"  # what our cells are
    extra_rows: tuple[tuple[str, str], ...] = ()  # (method pattern, label): rows beyond the paper

    @property
    def methods(self) -> list[str]:
        return list(self.values)

    @property
    def kl(self) -> bool:
        """The result compares KLs (log Z matters), not metrics of its own."""
        return self.metrics == KL_METRICS

    def extra_label(self, method: str) -> str | None:
        """The label of a row the paper has no numbers for, when the result names it."""
        return next((label for pat, label in self.extra_rows if fnmatchcase(method, pat)), None)

    def variant_of(self, config: dict[str, Any]) -> str:
        """The first variant whose config keys all match (an empty match takes the rest)."""
        for variant, match in self.variants.items():
            if all(_select(config, k) == v for k, v in match.items()):
                return variant
        return next(reversed(self.variants))


@cache
def _data() -> dict[str, Any]:
    text = resources.files("smclm.report").joinpath("paper_results.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def citation() -> str:
    return str(_data()["citation"]).strip()


def _all_results() -> dict[str, tuple[dict[str, Any], str]]:
    """Every result: name -> (its entry, its paper's citation); this paper's first."""
    out = {name: (r, citation()) for name, r in _data()["results"].items()}
    for paper in (_data().get("other_papers") or {}).values():
        cite = " ".join(str(paper["citation"]).split())
        out.update({name: (r, cite) for name, r in (paper.get("results") or {}).items()})
    return out


def result_names() -> list[str]:
    return list(_all_results())


def _metrics(r: dict[str, Any]) -> tuple[Metric, ...]:
    if not r.get("metrics"):
        return KL_METRICS
    return tuple(
        Metric(
            _metric_key(m["key"]),
            str(m["label"]),
            str(m["key"]),
            float(m.get("scale", 1.0)),
            int(m.get("digits", 3)),
        )
        for m in r["metrics"]
    )


def _cell(x: Any) -> list[float | None]:  # [mean, ci95], or a bare mean (no CI): [mean, None]
    return list(x) if isinstance(x, (list, tuple)) else [x, None]


def paper_result(name: str) -> PaperResult:
    results = _all_results()
    if name not in results:
        raise UserError(
            f"no paper result '{name}'; choose one of: {', '.join(results)} "
            "(their numbers are in smclm/report/paper_results.yaml)"
        )
    r, cite = results[name]
    variants = r.get("variants") or {"": {}}
    metrics = _metrics(r)
    by_source = {m.source: m.key for m in metrics if m.source}  # yaml keys -> row keys
    values: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for method, entry in (r.get("methods") or {}).items():
        entry = entry or {}
        per_variant = entry if r.get("variants") else ({"": entry} if entry else {})
        values[method] = {
            v: {by_source.get(k, k): _cell(x) for k, x in (cells or {}).items()}
            for v, cells in per_variant.items()
        }
    return PaperResult(
        name=name,
        title=r["title"],
        experiment=r["experiment"],
        task=r["task"],
        model=r["model"],
        classifier=r.get("classifier"),
        settings=" ".join(str(r.get("settings", "")).split()),
        note=r.get("note"),
        log_z=r.get("log_z"),
        ablation=bool(r.get("ablation", False)),
        variants=variants,
        values=values,
        citation=cite,
        metrics=metrics,
        paper_values=" ".join(str(r.get("paper_values", PaperResult.paper_values)).split()),
        units=" ".join(str(r.get("units", PaperResult.units)).split()),
        extra_rows=tuple((str(k), str(v)) for k, v in (r.get("extra_rows") or {}).items()),
    )


def check_methods(name: str, methods: list[str]) -> None:
    """Refuse (one line) a method the paper's result has no row for (nor an extra row)."""
    result = paper_result(name)
    missing = [m for m in methods if m not in result.values and result.extra_label(m) is None]
    if missing:
        extra = ", ".join(pat for pat, _ in result.extra_rows)
        raise UserError(
            f"{name} ({result.title}) has no paper numbers for method "
            f"{', '.join(missing)}; the paper's rows are: {', '.join(result.methods)}"
            f"{f' (and beyond the paper: {extra})' if extra else ''} "
            "(drop it from method=…, or train it with smclm train and compare with smclm table)"
        )


def _select(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _hydra_experiment(run_path: Path) -> str | None:
    path = run_path / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    try:
        hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    except (OSError, yaml.YAMLError):
        return None
    return (hydra.get("runtime", {}).get("choices") or {}).get("experiment")


def detect_result(runs: list[Any]) -> str | None:
    """The paper result the runs reproduce: recorded ``paper.result``, else the experiment."""
    recorded = {_select(r.config, "paper.result") for r in runs} - {None}
    if len(recorded) == 1:
        return str(recorded.pop())
    if len(recorded) > 1:
        raise UserError(
            f"the runs record several paper results ({', '.join(sorted(map(str, recorded)))}); "
            "make a table per result directory, or pick one with --paper <name>"
        )
    experiments = {_hydra_experiment(r.path) for r in runs} - {None}
    if len(experiments) != 1:
        return None
    exp = experiments.pop()
    matches = [
        n for n in result_names() if (res := paper_result(n)).experiment == exp and not res.ablation
    ]
    return matches[0] if len(matches) == 1 else None


# -- rows ---------------------------------------------------------------------------------------


def _natural(text: str) -> list[Any]:  # p0_3shot before p0_10shot
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _ours_value(result: PaperResult, metric: Metric, kls: dict[str, Any], final: dict) -> Any:
    if metric.source is None:
        return kls[metric.key]
    v = final.get(metric.source)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
        return None
    return float(v) * metric.scale


def build_paper_rows(
    result: PaperResult, runs: list[Any], finals: list[dict[str, Any]], log_z: float | None
) -> list[dict[str, Any]]:
    """One row per method × variant: ours (mean, ci95, n) beside the paper's (mean, ci95).
    A run's row is its method, or for an evaluation without a learner its sampler's label
    (:attr:`smclm.report.table.Run.sampler_label`, e.g. ``p0_3shot``)."""
    from smclm.report.table import _method_rank, mean_ci, run_kls

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run, final in zip(runs, finals):
        groups.setdefault((run.sampler_label, result.variant_of(run.config)), []).append(final)
    methods = result.methods + sorted(
        {m for m, _ in groups} - set(result.methods),
        key=lambda m: (_method_rank(m)[0], _natural(m)),
    )
    rows = []
    for method in methods:
        for variant in result.variants:
            finals_mv = groups.get((method, variant), [])
            kls = [run_kls(f, log_z) for f in finals_mv]
            paper = result.values.get(method, {}).get(variant, {})
            row: dict[str, Any] = {
                "task": result.task,
                "method": method,
                "variant": variant,
                "n": len(finals_mv),
                "in_paper": method in result.values,
            }
            steps = [f["at/step"] for f in finals_mv if "at/step" in f]
            if steps:
                row["at_step"] = sum(steps) / len(steps)
            for metric in result.metrics:
                key = metric.key
                ours_all = [_ours_value(result, metric, k, f) for k, f in zip(kls, finals_mv)]
                ours, ours_ci = mean_ci([v for v in ours_all if v is not None])
                p_mean, p_ci = paper.get(key, [None, None])
                row[key], row[f"{key}_ci95"] = ours, ours_ci
                row[f"paper_{key}"], row[f"paper_{key}_ci95"] = p_mean, p_ci
                row[f"diff_{key}"] = (
                    ours - p_mean if ours is not None and p_mean is not None else None
                )
            rows.append(row)
    return rows


def csv_keys(result: PaperResult) -> list[str]:
    """table.csv's metric columns of a paper result: ours, its CI, the paper's, its CI, Δ."""
    keys: list[str] = []
    for metric in result.metrics:
        key = metric.key
        keys += [key, f"{key}_ci95", f"paper_{key}", f"paper_{key}_ci95", f"diff_{key}"]
    return keys


# -- markdown -----------------------------------------------------------------------------------


def _ours(mean: float | None, ci: float | None, digits: int = 3) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if ci is None else f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _paper(mean: float | None, ci: float | None, metric: Metric | None = None) -> str:
    if mean is None:
        return "–"
    if metric is not None and metric.source is not None:  # the paper's own digits
        return f"{mean:g}" if ci is None else f"{mean:g} ± {ci:g}"
    return f"{mean:.2f}" if ci is None else f"{mean:.2f} ± {ci:.2f}"


def _diff(d: float | None, digits: int = 3) -> str:
    return "–" if d is None else f"{d:+.{digits}f}"


def _distinct(runs: list[Any], key: str) -> list[Any]:
    out: list[Any] = []
    for r in runs:
        v = _select(r.config, key)
        if v is not None and v not in out:
            out.append(v)
    return out


def _profile_lines(runs: list[Any]) -> list[str]:
    profiles = _distinct(runs, "paper.profile")
    if not profiles:
        return ["Profile: not recorded (these runs were not made by scripts/paper/*.sh)."]
    lines = [f"Profile: {', '.join(map(str, profiles))}."]
    if len(profiles) > 1:
        lines.append("**The runs mix profiles: their numbers are not comparable.**")
    reductions = [x for v in _distinct(runs, "paper.reductions") for x in v]
    reductions = list(dict.fromkeys(reductions))
    if reductions:
        lines.append(
            "Reductions from the paper's settings: " + ", ".join(f"`{x}`" for x in reductions) + "."
        )
    elif "paper" in profiles:
        lines.append("Reductions from the paper's settings: none.")
    extra = list(dict.fromkeys(x for v in _distinct(runs, "paper.overrides") for x in v))
    if extra:
        lines.append("Extra overrides: " + " ".join(f"`{x}`" for x in extra) + ".")
    return lines


def _difference_notes(result: PaperResult, runs: list[Any]) -> list[str]:
    notes = []
    models = _distinct(runs, "model.name")
    if models and models != [result.model]:
        notes.append(
            f"**Model differs from the paper's:** {', '.join(map(str, models))} instead of "
            f"{result.model}; the numbers are not expected to match the paper's."
        )
    classifiers = _distinct(runs, "task.classifier")
    if result.classifier and classifiers and classifiers != [result.classifier]:
        notes.append(
            f"**Classifier differs from the paper's:** {', '.join(map(str, classifiers))} "
            f"instead of {result.classifier}."
        )
    return notes


def render_paper_markdown(
    result: PaperResult,
    rows: list[dict[str, Any]],
    runs: list[Any],
    log_z: float | None,
    log_z_source: str,
    budget: str | None = None,
) -> str:
    variants = list(result.variants)
    lines = [f"# {result.title}: reproduction", ""]
    lines.append(f"Paper: {result.citation or citation()} Values: {result.paper_values}.")
    lines.append(f"Paper settings: {result.settings}")
    lines.append("")
    lines += _profile_lines(runs)
    lines += _difference_notes(result, runs)
    if result.note:
        lines.append(result.note)
    if result.kl:
        lz = "unknown" if log_z is None else f"{log_z:.4f}"
        paper_lz = "" if result.log_z is None else f"; the paper used the constant {result.log_z}"
        lines.append(f"log Z = {lz} ({log_z_source}{paper_lz}).")
    if budget:
        lines.append(
            f"**At equal compute: {budget}** — each run's metrics are those of its last "
            "evaluation within the budget (the paper's are at its final update)."
        )
    lines.append(f"Ours: mean ± 1.96·sd/√n over n seeds ({result.units}); Δ = ours − paper.")
    lines.append("")
    header, rule = ["method"], ["---"]
    for variant in variants:
        prefix = f"{variant} " if variant else ""
        for metric in result.metrics:
            header += [f"{prefix}{metric.label}", "paper", "Δ"]
            rule += ["---"] * 3
    if any("at_step" in r for r in rows):
        header.append("at update")
        rule.append("---")
    header.append("n")
    rule.append("---")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(rule) + "|")
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["variant"]] = row
    for method, per_variant in by_method.items():
        label = result.extra_label(method) or "not in the paper"
        name = method if per_variant[variants[0]]["in_paper"] else f"{method} ({label})"
        cells = [name]
        for variant in variants:
            row = per_variant[variant]
            for metric in result.metrics:
                key, digits = metric.key, metric.digits
                cells += [
                    _ours(row[key], row[f"{key}_ci95"], digits),
                    _paper(row[f"paper_{key}"], row[f"paper_{key}_ci95"], metric),
                    _diff(row[f"diff_{key}"], digits),
                ]
        if "at update" in header:
            steps = [per_variant[v].get("at_step") for v in variants]
            cells.append(" / ".join("–" if s is None else f"{s:g}" for s in steps))
        cells.append(" / ".join(str(per_variant[v]["n"]) for v in variants))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def render_paper_values(result: PaperResult) -> str:
    """The paper's numbers for one result (``smclm table --paper <name>`` without a directory)."""
    lines = [
        f"# {result.title} (the paper's numbers)",
        "",
        f"Paper: {result.citation or citation()}",
    ]
    lines += [f"Settings: {result.settings}", f"Values: {result.paper_values}.", ""]
    if not any(result.values.values()):
        lines.append(result.note or "The paper gives no numbers for this result.")
        return "\n".join(lines) + "\n"
    header = ["method"] + [
        f"{v} {metric.label}".strip() for v in result.variants for metric in result.metrics
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for method, per_variant in result.values.items():
        cells = [method]
        for variant in result.variants:
            for metric in result.metrics:
                cell = per_variant.get(variant, {}).get(metric.key, [None, None])
                cells.append(_paper(cell[0], cell[1], metric))
        lines.append("| " + " | ".join(cells) + " |")
    if result.note and not result.kl:
        lines += ["", result.note]
    return "\n".join(lines) + "\n"
