"""One checkpoint format for resume and for `smclm eval`/`sample`.

checkpoints/step_<N>/ holds twist.safetensors (the twist's parameters — never the frozen base
model), state.pt (optimizer state and RNG states) and meta.json (step, resolved config). A
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
from safetensors.torch import load_file, save_file
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
    optimizer: torch.optim.Optimizer | None,
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
    if twist is not None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in twist.state_dict().items()}
        save_file(tensors, str(tmp / "twist.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
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


def load_twist(ckpt: Path, twist: nn.Module | None) -> None:
    path = Path(ckpt) / "twist.safetensors"
    if twist is None:
        return
    if not path.exists():
        raise UserError(
            f"{ckpt} has no twist.safetensors; was the run trained with twist.kind=none?"
        )
    state = load_file(str(path))
    device = next(twist.parameters()).device
    twist.load_state_dict({k: v.to(device) for k, v in state.items()})


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
