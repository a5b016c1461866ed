"""Resuming a run: decided from the run directory's files before anything loads.

``resume=true``: a run already at ``train.updates`` is left untouched (one line, exit 0); a larger
``train.updates`` continues it; a config that would train or measure something else is refused,
naming the keys; an empty or missing run dir starts fresh; an unreadable newest checkpoint falls
back to the previous kept one. :func:`smclm.train.train` calls :func:`resume_point` first.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from smclm.checkpoint import ABSENT, checkpoint_dirs, config_differences, read_checkpoint
from smclm.compute import ComputeMeter
from smclm.errors import CheckpointError, UserError
from smclm.tracking import read_metrics, write_json_atomic

# Keys a resume may change: they change neither what is trained nor what is measured (where
# metrics go, progress bars, threads, the device, checkpoints kept, where the exact-sample cache
# lives and whether it may be filled). ``train.updates`` may grow (checked on its own); every
# other difference from the run's config.yaml is refused. ``model.dtype_resolved`` (the dtype
# ``model.dtype=auto`` chose, written once the model has loaded) is compared by train after
# loading: like the device, it may differ on another machine (a line says so).
RESUME_FREE_KEYS = (
    "resume",
    "verbose",
    "train.updates",
    "train.progress",
    "train.checkpoint_keep",
    "logger",
    "threads",
    "device",
    "exact_samples.cache_dir",
    "exact_samples.source",
    "exact_samples.max_draws",
    "model.dtype_resolved",
)


@dataclass
class ResumePoint:
    """Where a resumed run starts: its newest readable checkpoint and what was read from it."""

    ckpt: Path
    state: dict[str, Any]  # load_state(ckpt): optimizer, rng, extra, step, config
    saved: dict[str, Any]  # the run's saved resolved config (config.yaml)
    unreadable: list[Path] = field(default_factory=list)  # newer checkpoints that were damaged

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def eval_step(self) -> int:
        """The last evaluated step (checkpoints older than this record were all written after
        their evaluation)."""
        return int(self.state["extra"].get("eval_step", self.step))

    @property
    def evaluated(self) -> bool:
        return self.eval_step == self.step


class Finished(dict):
    """The summary of a run that was already complete: a resume that changed nothing."""


def resume_point(cfg: DictConfig, run_dir: Path) -> ResumePoint | None:
    """How a run starts, decided from its files before anything loads: None (fresh) or the
    checkpoint to resume from. Refuses (UserError) a run dir with checkpoints without
    resume=true, a resume whose config would train or measure something else, and a resume
    past ``train.updates``."""
    ckpts = checkpoint_dirs(run_dir, complete=False)
    if not ckpts:
        if (run_dir / "summary.json").exists():
            raise UserError(
                f"{run_dir} holds a finished run's summary.json but no checkpoints to resume "
                "from; choose another hydra.run.dir (or move that run away)"
            )
        if cfg.resume:
            print(
                f"smclm: resume=true but {run_dir} holds no checkpoint to resume: starting a "
                "fresh run",
                file=sys.stderr,
            )
        return None
    if not cfg.resume:
        raise UserError(
            f"{run_dir} already holds checkpoints; pass resume=true to continue that "
            "run, or choose another hydra.run.dir"
        )
    saved = _saved_config(run_dir, ckpts)
    new = OmegaConf.to_container(cfg, resolve=True)
    free = RESUME_FREE_KEYS
    if new["evaluator"]["name"] == "auto":  # resolved only once the model is loaded: see train
        free = (*free, "evaluator.name")
    diffs = config_differences(saved, new, free)
    if diffs:
        raise UserError(refusal(run_dir, diffs))
    unreadable: list[Path] = []
    for ckpt in reversed(ckpts):
        try:
            state = read_checkpoint(ckpt)
        except CheckpointError as e:
            unreadable.append(ckpt)
            print(f"smclm: {e}; trying the previous kept checkpoint", file=sys.stderr)
            continue
        point = ResumePoint(ckpt, state, saved, unreadable)
        if unreadable:
            print(f"smclm: resuming from {ckpt} (update {point.step})", file=sys.stderr)
        break
    else:
        raise CheckpointError(
            f"no readable checkpoint in {run_dir / 'checkpoints'} (all {len(ckpts)} are damaged, "
            "see above); start the run again in another hydra.run.dir"
        )
    updates = int(cfg.train.updates)
    if point.step > updates:
        raise UserError(
            f"train.updates={updates} but the run in {run_dir} is already at update "
            f"{point.step}; pass train.updates={point.step} or more to resume it"
        )
    return point


def _saved_config(run_dir: Path, ckpts: list[Path]) -> dict[str, Any]:
    """The run's resolved config: config.yaml, else the newest checkpoint's meta.json."""
    path = run_dir / "config.yaml"
    if path.is_file():
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    for ckpt in reversed(ckpts):
        try:
            return json.loads((ckpt / "meta.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            continue
    raise CheckpointError(
        f"{run_dir} has checkpoints but neither config.yaml nor a readable meta.json; "
        "start the run again in another hydra.run.dir"
    )


def refusal(run_dir: Path, diffs: list[tuple[str, Any, Any]]) -> str:
    def show(v: Any) -> str:
        return v if v == ABSENT else repr(v)

    shown = ", ".join(f"{k} (saved {show(a)}, now {show(b)})" for k, a, b in diffs[:4])
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return (
        f"resume=true: the run in {run_dir} was trained with other settings: {shown}{more}; "
        f"resume it with its own settings ({run_dir / 'config.yaml'}), or train the new ones "
        "in another hydra.run.dir"
    )


def complete(run_dir: Path, point: ResumePoint) -> Finished:
    """A resume of a run already at train.updates: change nothing, say so."""
    path = run_dir / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
    else:  # stopped between its last checkpoint and its summary: rebuilt from its records
        summary = summary_from_records(run_dir, point)
        write_json_atomic(path, summary)
    print(
        f"smclm: run {run_dir} is complete (update {point.step} of train.updates="
        f"{point.step}); nothing to do (a larger train.updates continues it)"
    )
    return Finished(summary)


def summary_from_records(run_dir: Path, point: ResumePoint) -> dict[str, Any]:
    rows = [r for r in read_metrics(run_dir) if r.get("step") == point.step]
    meter = ComputeMeter()
    meter.load_state_dict(point.state["extra"].get("compute", {}))
    merged: dict[str, Any] = {k: v for r in rows for k, v in r.items() if k != "step"}
    return {
        **merged,
        **meter.totals(),
        "run/task": point.saved["task"]["name"],
        "run/method": point.saved["method"]["name"],
        "run/evaluator": point.saved["evaluator"]["name"],
        "run/seed": int(point.saved["seed"]),
        "run/updates": point.step,
    }
