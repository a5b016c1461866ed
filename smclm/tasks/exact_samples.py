"""Exact samples from the target σ(s) ∝ p₀(s)·φ(s), and a disk cache for them.

``rejection_sample`` draws batches from p₀ and keeps each draw with probability
exp(log φ − log φ_max), where ``task.log_phi_max`` bounds log φ from above. The kept draws are
exact σ samples. For indicator potentials this keeps the hits. For class-probability potentials
it is the paper's stochastic-classification trick (keep s when a class drawn from the classifier
is the target class).

A stopping task (README "Stopping") draws from the sampler's masked p₀ proposal q (no stop before
m, the stop forced at T) and keeps a draw z with probability exp(log w − log φ_max), where
log w = log p₀(z) + log φ(z) − log q(z) ≤ log φ(z) (q only renormalises p₀ over fewer tokens, so
q ≥ p₀ on every draw): the kept draws are exact samples of σ(z) ∝ p₀(z)φ(z) over the finished
sequences with m ≤ ℓ ≤ T, padded to T.

``load_or_collect`` caches a sample set under a key that hashes every setting that determines
it: the model (name and toy settings), the task (including prompt ids and potential parameters),
the output length, the seed and n. Any changed setting gives a new key, so the samples are
collected again. Files are ``<key>.safetensors`` (tensor "samples") and ``<key>.json`` (the
settings, human-readable). Both are written atomically (a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import run_smc
from smclm.tasks.base import Task

log = logging.getLogger(__name__)


class InfeasibleError(ValueError):
    """Rejection sampling would need more draws from p₀ than allowed."""


def _infeasible_message(n: int, accepted: int, drawn: int, estimate: float, max_draws: int) -> str:
    rate = accepted / drawn if drawn else 0.0
    est = f"~{estimate:.3g}" if math.isfinite(estimate) else f"more than {drawn * n:.3g}"
    return (
        f"rejection sampling of {n} exact target samples is infeasible: acceptance rate "
        f"{rate:.3g} ({accepted}/{drawn} draws from p0) needs {est} draws, above "
        f"max_draws={max_draws}; lower n, raise max_draws, or use a less rare target"
    )


@torch.no_grad()
def rejection_sample(
    model: TwistedLM,
    task: Task,
    n: int,
    *,
    batch_size: int,
    generator: torch.Generator,
    max_draws: int | None = None,
    progress: bool = False,
    cond: Tensor | None = None,
) -> Tensor:
    """n exact samples [n, T] (long, CPU) from σ ∝ p₀·φ by rejection from p₀.

    cond: conditioning tokens o [c] shared by all draws (conditional tasks), or None.
    max_draws: the most draws from p₀ allowed; after every batch the draws needed are estimated
    from the acceptance rate so far, and InfeasibleError is raised as soon as the estimate (or the
    draws so far) exceed it. None: no limit.
    """
    if task.log_phi_max is None:
        raise ValueError(
            f"task '{task.name}' has no log_phi_max (an upper bound on log φ), which rejection "
            "sampling needs; set one for the potential or provide exact samples another way"
        )
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    p0 = model.with_twist(None)
    dev = model.device
    c_batch = None
    if cond is not None:
        c_batch = (cond if cond.dim() == 2 else cond[None]).to(dev).expand(batch_size, -1)
    log_phi_fn = task.bind(c_batch)
    log_max = float(task.log_phi_max)
    kept: list[Tensor] = []
    accepted = drawn = 0
    bar = tqdm(total=n, desc="exact samples", disable=not progress, unit="sample")
    try:
        while accepted < n:
            res = run_smc(
                p0,
                task.prompt_ids,
                task.output_len,
                log_phi_fn,
                batch_size,
                proposal="p0",
                ess_threshold=0.0,
                cond=c_batch,
                generator=generator,
            )
            excess = float(res.log_phi.max()) - log_max
            if excess > 1e-4:
                raise ValueError(
                    f"log φ = {log_max + excess:.4g} exceeds task.log_phi_max = {log_max:.4g}; "
                    "the bound is wrong, so rejection sampling would not be exact"
                )
            # fixed length: q = p₀, so log w = log φ; stopping: log w = log φ + log p₀/q ≤ log φ
            log_accept = res.log_phi if task.stopping is None else res.log_w
            accept_p = torch.exp((log_accept.double() - log_max).clamp(max=0.0))
            u = torch.rand(batch_size, generator=generator, device=accept_p.device)
            keep = u.double() < accept_p
            new = res.tokens[keep].cpu()
            kept.append(new)
            drawn += batch_size
            take = min(int(new.shape[0]), n - accepted)
            accepted += int(new.shape[0])
            bar.update(take)
            bar.set_postfix(drawn=drawn, rate=f"{accepted / drawn:.3g}")
            if accepted < n and max_draws is not None:
                estimate = n * drawn / accepted if accepted else math.inf
                if estimate > max_draws or drawn >= max_draws:
                    raise InfeasibleError(
                        _infeasible_message(n, accepted, drawn, estimate, max_draws)
                    )
    finally:
        bar.close()
    log.info(
        "rejection sampling: %d/%d draws accepted (rate %.3g)", accepted, drawn, accepted / drawn
    )
    return torch.cat(kept)[:n].long()


# -- disk cache -------------------------------------------------------------------------------


def _canonical(obj: Any) -> Any:
    """JSON-ready, order-independent form of a settings object."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _canonical(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    try:  # OmegaConf containers
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return _canonical(OmegaConf.to_container(obj, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"cannot use a {type(obj).__name__} in exact-sample cache settings")


def _canonical_json(settings: Mapping) -> str:
    return json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"))


def cache_key(settings: dict) -> str:
    """sha256 of the canonical JSON of the settings, first 16 hex characters."""
    return hashlib.sha256(_canonical_json(settings).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_collect(
    cache_dir: str | os.PathLike, settings: dict, collect_fn: Callable[[], Tensor]
) -> tuple[Tensor, bool]:
    """Load the samples cached for these settings, or call collect_fn and cache its result.

    Returns (samples, from_cache). A cached file whose stored settings differ (a hash collision)
    or that cannot be read is ignored and the samples are collected again.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(settings)
    st_path = cache_dir / f"{key}.safetensors"
    js_path = cache_dir / f"{key}.json"
    canon = _canonical(settings)
    if st_path.exists() and js_path.exists():
        try:
            stored = json.loads(js_path.read_text())
            if stored == canon:
                return load_file(str(st_path))["samples"], True
            log.warning("exact-sample cache %s holds other settings; collecting again", st_path)
        except Exception as err:  # a corrupt or partial file: collect again
            log.warning("cannot read exact-sample cache %s (%s); collecting again", st_path, err)
    samples = collect_fn()
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(canon, sort_keys=True, indent=2) + "\n"
    _atomic_write(js_path, lambda p: Path(p).write_text(text))
    tensor = samples.detach().cpu().contiguous()
    _atomic_write(st_path, lambda p: save_file({"samples": tensor}, p))
    return samples, False
