"""The reproduction report: our KLs beside the paper's, per method and KL direction.

The paper's numbers are in ``paper_results.yaml`` beside this file (one entry per paper result,
with its citation); nothing here hard-codes a number. A sweep is a paper setting when its runs
record ``paper.result`` (scripts/paper/*.sh pass ``+paper.result=<name>``, with the profile and
its reductions), when ``smclm table --paper <name>`` says so, or when the runs' Hydra choices name
an experiment that exactly one non-ablation result uses (e.g. ``experiment=infilling_2`` →
Table 8).

Rows are the paper's methods (then any other method the sweep ran, with no paper value); each
KL cell is our mean ± 1.96·sd/√n over seeds with the task's consistent log Z (as in
:mod:`smclm.report.table`), beside the paper's mean ± 95% CI and the difference ours − paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from smclm.errors import UserError

KL_KEYS = (("kl_q_sigma", "KL(q‖σ)"), ("kl_sigma_q", "KL(σ‖q)"))


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
    values: dict[str, dict[str, dict[str, list[float]]]]  # method -> variant -> kl key -> [m, ci]

    @property
    def methods(self) -> list[str]:
        return list(self.values)

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


def result_names() -> list[str]:
    return list(_data()["results"])


def paper_result(name: str) -> PaperResult:
    results = _data()["results"]
    if name not in results:
        raise UserError(
            f"no paper result '{name}'; choose one of: {', '.join(results)} "
            "(their numbers are in smclm/report/paper_results.yaml)"
        )
    r = results[name]
    variants = r.get("variants") or {"": {}}
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for method, entry in (r.get("methods") or {}).items():
        entry = entry or {}
        values[method] = entry if r.get("variants") else ({"": entry} if entry else {})
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
    )


def check_methods(name: str, methods: list[str]) -> None:
    """Refuse (one line) a method the paper's result has no row for."""
    result = paper_result(name)
    missing = [m for m in methods if m not in result.values]
    if missing:
        raise UserError(
            f"{name} ({result.title}) has no paper numbers for method "
            f"{', '.join(missing)}; the paper's rows are: {', '.join(result.methods)} "
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


def build_paper_rows(
    result: PaperResult, runs: list[Any], finals: list[dict[str, Any]], log_z: float | None
) -> list[dict[str, Any]]:
    """One row per method × variant: ours (mean, ci95, n) beside the paper's (mean, ci95)."""
    from smclm.report.table import _method_rank, mean_ci, run_kls

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run, final in zip(runs, finals):
        groups.setdefault((run.method, result.variant_of(run.config)), []).append(final)
    methods = result.methods + sorted(
        {m for m, _ in groups} - set(result.methods), key=_method_rank
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
            for key, _ in KL_KEYS:
                ours, ours_ci = mean_ci([v for k in kls if (v := k[key]) is not None])
                p_mean, p_ci = paper.get(key, [None, None])
                row[key], row[f"{key}_ci95"] = ours, ours_ci
                row[f"paper_{key}"], row[f"paper_{key}_ci95"] = p_mean, p_ci
                row[f"diff_{key}"] = (
                    ours - p_mean if ours is not None and p_mean is not None else None
                )
            rows.append(row)
    return rows


# -- markdown -----------------------------------------------------------------------------------


def _ours(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.3f}" if ci is None else f"{mean:.3f} ± {ci:.3f}"


def _paper(mean: float | None, ci: float | None) -> str:
    return "–" if mean is None else f"{mean:.2f} ± {ci:.2f}"


def _diff(d: float | None) -> str:
    return "–" if d is None else f"{d:+.3f}"


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
    lines.append(f"Paper: {citation()} Values: mean ± 95% CI over 5 seeds.")
    lines.append(f"Paper settings: {result.settings}")
    lines.append("")
    lines += _profile_lines(runs)
    lines += _difference_notes(result, runs)
    if result.note:
        lines.append(result.note)
    lz = "unknown" if log_z is None else f"{log_z:.4f}"
    paper_lz = "" if result.log_z is None else f"; the paper used the constant {result.log_z}"
    lines.append(f"log Z = {lz} ({log_z_source}{paper_lz}).")
    if budget:
        lines.append(
            f"**At equal compute: {budget}** — each run's metrics are those of its last "
            "evaluation within the budget (the paper's are at its final update)."
        )
    lines.append(
        "Ours: mean ± 1.96·sd/√n over n seeds (KL in nats, single-sample q); Δ = ours − paper."
    )
    lines.append("")
    header, rule = ["method"], ["---"]
    for variant in variants:
        prefix = f"{variant} " if variant else ""
        for _, label in KL_KEYS:
            header += [f"{prefix}{label}", "paper", "Δ"]
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
        name = method if per_variant[variants[0]]["in_paper"] else f"{method} (not in the paper)"
        cells = [name]
        for variant in variants:
            row = per_variant[variant]
            for key, _ in KL_KEYS:
                cells += [
                    _ours(row[key], row[f"{key}_ci95"]),
                    _paper(row[f"paper_{key}"], row[f"paper_{key}_ci95"]),
                    _diff(row[f"diff_{key}"]),
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
    lines = [f"# {result.title} (the paper's numbers)", "", f"Paper: {citation()}"]
    lines += [f"Settings: {result.settings}", ""]
    if not any(result.values.values()):
        lines.append(result.note or "The paper gives no numbers for this result.")
        return "\n".join(lines) + "\n"
    header = ["method"] + [f"{v} {label}".strip() for v in result.variants for _, label in KL_KEYS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for method, per_variant in result.values.items():
        cells = [method]
        for variant in result.variants:
            for key, _ in KL_KEYS:
                cells.append(_paper(*per_variant.get(variant, {}).get(key, [None, None])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
