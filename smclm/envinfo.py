"""The environment a run ran in: written as ``env.json`` into every run directory, printed by
``smclm --version`` and into every paper report.

The lock: ``make install`` installs one of requirements/{cpu,cuda}.txt and records it in the venv
(``python -m smclm.envinfo --record-lock <file>`` writes ``<venv>/smclm-lock.json``); an
environment installed another way (``pip install smclm``) records ``lock: null``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

LOCK_RECORD = "smclm-lock.json"
SOURCE = Path(__file__).resolve().parents[1]  # the checkout, for an editable install


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_lock(lock_file: str | Path) -> Path:
    """Note in the active environment which lock it was installed from (make install)."""
    path = Path(lock_file)
    record = {"file": path.as_posix(), "sha256": sha256_file(path)}
    out = Path(sys.prefix) / LOCK_RECORD
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def installed_lock() -> dict[str, Any] | None:
    path = Path(sys.prefix) / LOCK_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    current = SOURCE / record.get("file", "")
    if current.is_file():  # a lock edited after the install: the venv is not what it says
        record["matches_file"] = sha256_file(current) == record.get("sha256")
    return record


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    if not (SOURCE / ".git").exists():
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """smclm's version and commit, Python, torch (CUDA, cuDNN), transformers, the lock, and the
    machine: what a reader needs to reproduce a run's environment."""
    import torch

    commit = _git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked=no"))
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "smclm": _version("smclm") or "unknown",
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "transformers": _version("transformers"),
        "lock": installed_lock(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "device": str(device) if device is not None else ("cuda" if cuda else "cpu"),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return env


def write_env(run_dir: str | Path, device: Any = None) -> Path:
    """env.json in a run directory. A resumed run keeps the first record and lists each later
    launch whose environment differed under ``resumes``."""
    from smclm.tracking import write_json_atomic

    path = Path(run_dir) / "env.json"
    env = environment(device)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        same = {k: v for k, v in old.items() if k not in ("time", "resumes")} == {
            k: v for k, v in env.items() if k != "time"
        }
        if not same:
            old.setdefault("resumes", []).append(env)
        env = old
    write_json_atomic(path, env)
    return path


def version_text(env: dict[str, Any] | None = None) -> str:
    """`smclm --version`: one screen."""
    env = environment() if env is None else env
    lock = env["lock"]
    if lock is None:
        lock_text = "none (not installed by make install: versions from pyproject.toml's ranges)"
    else:
        lock_text = f"{lock['file']} sha256:{lock['sha256'][:16]}"
        if lock.get("matches_file") is False:
            lock_text += " (the file has changed since: run make install)"
    commit = env["commit"]
    commit_text = "not a git checkout" if commit is None else commit[:12]
    if env["dirty"]:
        commit_text += " (uncommitted changes)"
    torch_text = env["torch"]
    if env["cuda"]:
        torch_text += f" (CUDA {env['cuda']}, cuDNN {env['cudnn']})"
    rows = [
        ("smclm", f"{env['smclm']}, commit {commit_text}"),
        ("python", env["python"]),
        ("torch", torch_text),
        ("transformers", env["transformers"] or "not installed"),
        ("lock", lock_text),
        ("machine", f"{env['platform']}, {env['cpu_count']} CPU cores ({env['cpu']})"),
        ("gpu", env["gpu"] or "none"),
    ]
    return "\n".join(f"{k:13s} {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m smclm.envinfo")
    ap.add_argument(
        "--record-lock", metavar="FILE", help="note the lock this venv was installed from"
    )
    a = ap.parse_args(argv)
    if a.record_lock:
        print(f"recorded {a.record_lock} in {record_lock(a.record_lock)}")
    else:
        print(version_text())


if __name__ == "__main__":
    main()
