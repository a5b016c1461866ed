"""Config checks that run before any model loads. Each failure is one line: key, value, the fix."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smclm.errors import ConfigError
from smclm.smc.resampling import RESAMPLERS

GROUPS = ("task", "model", "method", "twist", "smc", "evaluator", "logger", "experiment")


def config_dir() -> Path:
    """The Hydra config tree: ``configs/`` at the top of the repository, installed as the
    package ``smclm.configs`` (see pyproject.toml)."""
    return Path(str(resources.files("smclm.configs")))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def check_group_overrides(overrides: list[str]) -> None:
    """Reject `group=option` overrides whose option file does not exist (before Hydra runs).

    Sweeps (`method=ctl,rl`) are checked option by option.
    """
    for arg in overrides:
        if "=" not in arg or arg.startswith(("+", "~", "-")):
            continue
        key, value = arg.split("=", 1)
        key = key.removeprefix("override ")
        if key not in GROUPS or value in ("null", ""):
            continue
        options = group_options(key)
        for opt in value.split(","):
            if opt not in options:
                raise ConfigError(
                    f"unknown {key} '{opt}'; choose one of: {', '.join(options) or '(none yet)'}"
                )


def apply_per_method(cfg: DictConfig) -> None:
    """Merge ``per_method.<method.name>`` (an experiment's per-learner settings, e.g. the
    paper's learning rate of each method) into ``method``. Command-line ``method.*`` overrides
    still win: they are applied again on top."""
    per = cfg.get("per_method")
    if not per or cfg.method.name not in per:
        return
    from hydra.core.hydra_config import HydraConfig

    explicit: list[str] = []
    if HydraConfig.initialized():
        for arg in HydraConfig.get().overrides.task:
            key = arg.partition("=")[0].lstrip("+~")
            if key.startswith("method."):
                explicit.append(key.removeprefix("method."))
    original = cfg.method
    merged = OmegaConf.merge(OmegaConf.to_container(original), per[cfg.method.name])
    for key in explicit:
        OmegaConf.update(merged, key, OmegaConf.select(original, key), force_add=True)
    OmegaConf.set_struct(cfg, False)
    cfg.method = merged


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> None:
    """Check values the sampler and trainer rely on; raise ConfigError with the fix."""
    from smclm.methods import METHODS

    smc = cfg.smc
    n = smc.n_particles
    _require(
        isinstance(n, int) and n > 0,
        f"smc.n_particles={n} must be a positive integer (e.g. smc.n_particles=64)",
    )
    thr = smc.ess_threshold
    _require(
        isinstance(thr, (int, float)) and 0.0 <= float(thr) <= 1.0,
        f"smc.ess_threshold={thr} must be in [0, 1] (1 = resample every step, 0 = never)",
    )
    _require(
        smc.resampling in RESAMPLERS,
        f"smc.resampling={smc.resampling} is not one of: {', '.join(RESAMPLERS)}",
    )
    t_len = cfg.task.output_len
    _require(
        isinstance(t_len, int) and t_len > 0, f"task.output_len={t_len} must be a positive integer"
    )
    method = cfg.method.name
    _require(
        method == "none" or method in METHODS,
        f"unknown method '{method}'; choose one of: {', '.join(sorted(METHODS))}",
    )
    if "optimizer" in cfg:
        lr = cfg.optimizer.lr
        _require(
            isinstance(lr, (int, float)) and lr > 0,
            f"optimizer.lr={lr} must be a positive number (e.g. optimizer.lr=1e-4)",
        )
    if "train" in cfg:
        tr = cfg.train
        _require(
            isinstance(tr.updates, int) and tr.updates >= 0,
            f"train.updates={tr.updates} must be a non-negative integer",
        )
        _require(
            tr.schedule in ("linear", "exponential"),
            f"train.schedule={tr.schedule} must be linear or exponential",
        )
        _require(
            isinstance(tr.eval_every, int) and tr.eval_every > 0,
            f"train.eval_every={tr.eval_every} must be a positive integer",
        )
        _require(method != "none", "smclm train needs a learner: set method=ctl|rl|sixo|fudge|dpg")
    if cfg.get("exact_samples") is not None:
        src = cfg.exact_samples.source
        _require(
            src in ("auto", "cache", "none"),
            f"exact_samples.source={src} must be auto, cache or none",
        )
    mbs = cfg.method.get("mini_batch_size")
    if mbs is not None:
        _require(
            isinstance(mbs, int) and mbs > 0 and n % mbs == 0,
            f"method.mini_batch_size={mbs} must divide the batch smc.n_particles={n}; choose a "
            "divisor, or null for the whole batch",
        )
    ppc = cfg.method.get("particles_per_cond")
    if cfg.task.get("cond_len") and ppc is not None:
        _require(
            isinstance(ppc, int) and ppc > 0 and n % ppc == 0,
            f"method.particles_per_cond={ppc} must divide smc.n_particles={n} (the update's rows "
            "are groups of particles sharing an o); change one of them",
        )
    _require(
        cfg.twist.kind in ("none", "head", "separate"),
        f"twist.kind={cfg.twist.kind} must be none, head or separate",
    )
    _require(
        cfg.evaluator.name in ("none", "exact", "bounds"),
        f"evaluator={cfg.evaluator.name} is not one of: none, exact, bounds",
    )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
