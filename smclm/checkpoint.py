"""One checkpoint format for resume and for `smclm eval`/`sample`.

checkpoints/step_<N>/ holds params.safetensors (the trained modules — twist and/or policy, keys
``twist.*``/``policy.*`` — never the frozen base model), state.pt (optimizer state, RNG states and
a policy method's own state) and meta.json (step, resolved config). A
checkpoint is written into a temporary directory and renamed into place, so a run killed while
saving never leaves a half-written checkpoint behind. A checkpoint damaged afterwards (a
truncated file, a file deleted by hand) is found by ``read_checkpoint`` and reported as a
CheckpointError naming the file; a resume then falls back to the previous kept checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smclm.errors import CheckpointError, UserError

if TYPE_CHECKING:  # torch and safetensors are imported where they are used: the CLI checks
    import torch  # run=/checkpoint= before it imports them
    from torch import nn


def checkpoint_dirs(run_dir: Path, complete: bool = True) -> list[Path]:
    """checkpoints/step_<N> of a run, oldest first; ``complete=False`` also lists those whose
    meta.json is missing (damaged ones, for a resume to report)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [
        p
        for p in root.glob("step_*")
        if p.is_dir()
        and p.name.split("_", 1)[1].isdigit()
        and (not complete or (p / "meta.json").exists())
    ]
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
    import torch
    from safetensors.torch import save_model

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


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(
        f"checkpoint {path.parent}: {path.name} cannot be read ({type(e).__name__}: {first}); "
        "it is truncated or damaged"
    )


def check_params_file(ckpt: Path) -> None:
    """A CheckpointError unless params.safetensors (if the checkpoint has trained parameters)
    has a whole header and every byte it announces: safetensors checks both when it opens a
    file, without reading the tensors."""
    path = Path(ckpt) / "params.safetensors"
    if not path.exists():
        return  # a run with nothing trained writes none; load_params says so if one is needed
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError, OSError
        raise _unreadable(path, e) from e


def read_checkpoint(ckpt: Path) -> dict[str, Any]:
    """``load_state(ckpt)`` after checking that every file of the checkpoint can be read;
    a CheckpointError naming the file otherwise (never a traceback)."""
    ckpt = Path(ckpt)
    for name in ("meta.json", "state.pt"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing")
    check_params_file(ckpt)
    return load_state(ckpt)


def set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to checkpoints/unreadable_step_<N> (kept for inspection, no
    longer found by ``checkpoint_dirs``)."""
    ckpt = Path(ckpt)
    target = ckpt.with_name(f"unreadable_{ckpt.name}")
    k = 1
    while target.exists():
        target, k = ckpt.with_name(f"unreadable_{ckpt.name}.{k}"), k + 1
    os.replace(ckpt, target)
    return target


def load_params(ckpt: Path, modules: nn.Module | None) -> None:
    """Load a checkpoint's trained parameters into ``model.trainables()``."""
    path = Path(ckpt) / "params.safetensors"
    if modules is None or not list(modules.parameters()):
        return
    if not path.exists():
        raise UserError(f"{ckpt} has no params.safetensors; it was not written by smclm train")
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    device = next(modules.parameters()).device
    try:
        missing, unexpected = load_model(modules, str(path), strict=False, device=str(device))
    except (SafetensorError, OSError) as e:  # a truncated or damaged file
        raise _unreadable(path, e) from e
    if missing or unexpected:
        raise UserError(
            f"{ckpt} does not match this model (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); evaluate it with the run's own config"
        )


def load_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's state.pt and meta.json: optimizer, rng, extra, step, config."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        step, config = int(meta["step"]), meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(ckpt / "meta.json", e) from e
    import torch

    try:
        state = torch.load(ckpt / "state.pt", weights_only=False)
    except Exception as e:  # a truncated zip archive, EOF, a bad pickle, a missing file
        raise _unreadable(ckpt / "state.pt", e) from e
    return {**state, "step": step, "config": config}


ABSENT = "(absent)"  # the value of a key one of two compared configs does not have


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """A resolved config as {dotted key: value} (lists are values)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(
    saved: dict, new: dict, free: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key of two resolved configs that differs,
    except the keys in ``free`` and below them. A key only one side has differs too."""
    a, b = flat_config(saved), flat_config(new)

    def is_free(key: str) -> bool:
        return any(key == f or key.startswith(f + ".") for f in free)

    return [
        (k, a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(a.keys() | b.keys())
        if not is_free(k) and a.get(k, ABSENT) != b.get(k, ABSENT)
    ]


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> Path:
    """The chosen (or newest) checkpoint of a run, or a UserError that says what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run={run_dir}: no such directory; give a run directory from smclm train")
    if checkpoint:
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else run / "checkpoints" / checkpoint
        if not (ckpt / "meta.json").exists():
            have = ", ".join(p.name for p in checkpoint_dirs(run)) or "none"
            raise UserError(
                f"checkpoint={checkpoint}: not a checkpoint directory of {run} (it has: {have}); "
                "give one of those, or leave checkpoint unset for the newest"
            )
        return ckpt
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise UserError(
            f"run={run_dir} has no checkpoints (expected {run}/checkpoints/step_*); "
            "train it first, or pass a directory written by smclm train"
        )
    return ckpt
