"""One checkpoint format for resume and for `smclm eval`/`sample`.

checkpoints/step_<N>/ holds params.safetensors (the trained modules — twist and/or policy, keys
``twist.*``/``policy.*`` — never the frozen base model), state.pt (optimizer state, RNG states and
a policy method's own state) and meta.json (step, resolved config). A
checkpoint is written into a temporary directory and renamed into place, so a run killed while
saving never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from smclm.errors import UserError


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.glob("step_*") if (p / "meta.json").exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    twist: nn.Module | None,
    optimizer: torch.optim.Optimizer | dict | None,
    rng: dict[str, Any],
    config: dict,
    keep: int = 2,
    extra: dict | None = None,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if twist is not None:  # save_model handles tied weights (a full policy's LM head)
        save_model(twist, str(tmp / "params.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer,
            "rng": rng,
            "extra": extra or {},
        },
        tmp / "state.pt",
    )
    (tmp / "meta.json").write_text(json.dumps({"step": step, "config": config}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_params(ckpt: Path, modules: nn.Module | None) -> None:
    """Load a checkpoint's trained parameters into ``model.trainables()``."""
    path = Path(ckpt) / "params.safetensors"
    if modules is None or not list(modules.parameters()):
        return
    if not path.exists():
        raise UserError(f"{ckpt} has no params.safetensors; it was not written by smclm train")
    device = next(modules.parameters()).device
    missing, unexpected = load_model(modules, str(path), strict=False, device=str(device))
    if missing or unexpected:
        raise UserError(
            f"{ckpt} does not match this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); evaluate it with the run's own config"
        )


def load_state(ckpt: Path) -> dict[str, Any]:
    meta = json.loads((Path(ckpt) / "meta.json").read_text())
    state = torch.load(Path(ckpt) / "state.pt", weights_only=False)
    return {**state, "step": meta["step"], "config": meta["config"]}


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The chosen (or newest) checkpoint of a run, or a UserError that says what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run={run_dir}: no such directory; give a run directory from smclm train")
    if checkpoint:
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else run / "checkpoints" / checkpoint
        if not (ckpt / "meta.json").exists():
            raise UserError(f"checkpoint={checkpoint}: not a checkpoint directory of {run}")
        return ckpt
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(
            f"run={run_dir} has no checkpoints (expected {run}/checkpoints/step_*); "
            "train it first, or pass a directory written by smclm train"
        )
    return ckpt
