"""The install lock, the environment record of a run, and who speaks on the terminal.

- requirements/{cpu,cuda}.txt satisfy every range of pyproject.toml (the two cannot drift apart
  silently) and hold exact, hashed versions; `make install` installs from the lock.
- A run dir's env.json has every key, and its lock hash is the lock file's.
- Third-party log lines and warnings go to <run dir>/smclm.log, not the terminal, unless
  verbose=true.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_smclm
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCKS = ("cpu", "cuda")
ENV_KEYS = {
    "smclm",
    "commit",
    "dirty",
    "python",
    "torch",
    "cuda",
    "cudnn",
    "transformers",
    "lock",
    "platform",
    "cpu",
    "cpu_count",
    "gpu",
    "device",
    "time",
}


def _lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """{package: (version, hashes)} of requirements/<name>.txt."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (REPO / "requirements" / f"{name}.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line[0].isspace():
            m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", line)
            assert m, f"{name}.txt: not an exact pin: {line!r}"
            current = canonicalize_name(m.group(1))
            pins[current] = (Version(m.group(2)), [])
        else:
            pins[current][1].extend(re.findall(r"--hash=sha256:([0-9a-f]{64})", line))
    return pins


def _pyproject_requirements() -> list[Requirement]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "gguf", "slurm"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("name", LOCKS)
def test_the_lock_satisfies_every_range_of_pyproject(name):
    pins = _lock(name)
    assert len(pins) > 50  # the whole environment, not only the direct dependencies
    for req in _pyproject_requirements():
        key = canonicalize_name(req.name)
        assert key in pins, f"{name}.txt lacks {req.name} (pyproject: {req}); run make lock"
        version, _ = pins[key]
        # a local version label (torch's +cpu) does not take part in a range
        assert req.specifier.contains(version, prereleases=True), (
            f"{name}.txt pins {req.name}=={version} outside pyproject's {req}; run make lock"
        )
    for pkg, (_, hashes) in pins.items():
        assert hashes, f"{name}.txt: {pkg} has no hash"


def test_the_two_locks_differ_only_in_torch_and_its_cuda_runtime():
    cpu, cuda = _lock("cpu"), _lock("cuda")
    assert str(cpu["torch"][0]).endswith("+cpu") and cuda["torch"][0].local is None
    assert cpu["torch"][0].public == cuda["torch"][0].public
    extra = set(cuda) - set(cpu)
    assert extra and all(re.match(r"^(nvidia-|cuda-|triton$)", p) for p in extra), extra
    assert not set(cpu) - set(cuda)
    for pkg in set(cpu) - {"torch"}:
        assert cpu[pkg] == cuda[pkg], pkg


def test_make_install_uses_the_lock(tmp_path):
    """`make install` (which make demo, make test and .ci/run go through) installs exactly the
    lock, with hashes and without resolving dependencies."""
    for lock in LOCKS:
        dry = subprocess.run(
            ["make", "-n", "-B", "install", f"LOCK={lock}", f"VENV={tmp_path / 'v'}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert f"--no-deps --require-hashes -r requirements/{lock}.txt" in dry, dry
        assert "--no-deps --no-build-isolation -e ." in dry, dry
        assert f"--record-lock requirements/{lock}.txt" in dry, dry
        # nothing else is installed: every pip install line is the pinned pip, the lock or smclm
        installs = [ln for ln in dry.splitlines() if " install " in ln]
        assert len(installs) == 3, installs
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
    test_recipe = subprocess.run(
        ["make", "-n", "-B", "test", f"VENV={tmp_path / 'v'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--require-hashes -r requirements/" in test_recipe  # make test installs from the lock


def _train_tiny(run_dir: Path, *extra: str):
    return run_smclm(
        "train",
        "experiment=toy_ctl",
        "train.updates=1",
        "train.eval_every=1",
        "train.progress=false",
        f"hydra.run.dir={run_dir}",
        *extra,
        env={"SMCLM_CACHE": run_dir.parent / "cache"},
    )


def test_a_run_records_its_environment(tmp_path):
    run = tmp_path / "run"
    proc = _train_tiny(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads((run / "env.json").read_text())
    assert ENV_KEYS <= set(env), ENV_KEYS - set(env)
    import torch
    import transformers

    assert env["torch"] == torch.__version__
    assert env["transformers"] == transformers.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["device"] == "cpu" and env["cpu_count"] == os.cpu_count()
    record = Path(sys.prefix) / "smclm-lock.json"
    if record.exists():  # installed by make install: the lock it came from, by hash
        lock_file = REPO / env["lock"]["file"]
        assert lock_file.parent == REPO / "requirements", env["lock"]
        assert env["lock"]["sha256"] == hashlib.sha256(lock_file.read_bytes()).hexdigest()
        assert env["lock"]["matches_file"] is True
    else:  # pip install into an environment of one's own: no lock to name
        assert env["lock"] is None
    if env["commit"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", env["commit"]) and isinstance(env["dirty"], bool)
    # --version prints the same facts
    version = run_smclm("--version")
    assert version.returncode == 0, version.stderr
    assert f"torch         {torch.__version__}" in version.stdout
    assert (env["lock"] is None) == ("lock          none" in version.stdout)
    if env["lock"] is not None:
        assert env["lock"]["sha256"][:16] in version.stdout


NOISY_SCORER = """
import logging
import warnings

def score(texts):
    logging.getLogger("somelib.sub").warning("third-party log line")
    warnings.warn("third-party warning", UserWarning)
    logging.getLogger("smclm.plugin_check").warning("our own warning")
    return [1.0 + len(t) for t in texts]
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_only_smclm_speaks_on_the_terminal(tmp_path, verbose):
    (tmp_path / "noisy_scorer.py").write_text(textwrap.dedent(NOISY_SCORER))
    run = tmp_path / "run"
    proc = run_smclm(
        "train",
        "task=text_scorer",
        "task.scorer={_target_:noisy_scorer.score,_partial_:true}",
        "evaluator=exact",
        "train.updates=1",
        "train.eval_every=1",
        "train.progress=false",
        "exact_samples.source=none",
        f"verbose={str(verbose).lower()}",
        f"hydra.run.dir={run}",
        env={"PYTHONPATH": tmp_path, "SMCLM_CACHE": tmp_path / "cache"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "smclm.log").read_text()
    for line in ("third-party log line", "third-party warning", "our own warning"):
        assert line in log, log[-2000:]
    out = proc.stdout + proc.stderr
    assert "smclm: warning: our own warning" in proc.stderr
    assert ("third-party log line" in out) == verbose, out[-3000:]
    assert ("third-party warning" in out) == verbose, out[-3000:]
