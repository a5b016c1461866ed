"""Where metrics go: metrics.jsonl (one JSON object per logged step), summary.json, and wandb.

wandb is imported lazily and only when ``logger=wandb``; ``logger.mode=offline`` needs no network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def _clean(v: Any) -> Any:
    """NaN becomes null (strict JSON); ±inf stays (Python's json writes Infinity)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(obj, dict):
        obj = {k: _clean(v) for k, v in obj.items()}
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


class Tracker:
    """Appends metric rows to run_dir/metrics.jsonl and forwards them to wandb if configured."""

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: DictConfig | None,
        cfg: DictConfig | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._wandb = None
        if logger_cfg is not None and logger_cfg.name == "wandb":
            import wandb

            self._wandb = wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                mode=logger_cfg.mode,
                dir=str(self.run_dir),
                resume="allow",
                id=self._wandb_id(),
                config=OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None,
            )

    def _wandb_id(self) -> str:
        id_file = self.run_dir / ".wandb_id"
        if not id_file.exists():
            import uuid

            id_file.write_text(uuid.uuid4().hex[:12])
        return id_file.read_text().strip()

    def _truncate_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again),
        and a last row cut short by a kill while it was written."""
        keep = [line for line, row in _rows(self.path) if row.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step
            )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of a metrics.jsonl; a line that does not parse (a row cut short when its
    process was killed while writing) is left out."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append((line, row))
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [row for _, row in _rows(path)]
