"""Config checks that run before any model loads. Each failure is one line: key, value, the fix."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from smclm.errors import ConfigError

GROUPS = ("task", "model", "method", "twist", "smc", "evaluator", "logger", "experiment")


def config_dir() -> Path:
    """The Hydra config tree: ``configs/`` at the top of the repository, installed as the
    package ``smclm.configs`` (see pyproject.toml)."""
    return Path(str(resources.files("smclm.configs")))


def search_dirs(overrides: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """The config directories Hydra searches: the package's, then the user's: the entries of a
    ``hydra.searchpath=[…]`` override, else ``$SMCLM_CONFIG_PATH`` (as in the primary configs'
    ``hydra.searchpath``). Entries are ``file://<dir>``, ``pkg://<package>`` or a plain dir."""
    import os

    entries: list[str] | None = None
    for arg in overrides:
        if arg.partition("=")[0].lstrip("+") == "hydra.searchpath":
            from hydra.core.override_parser.overrides_parser import OverridesParser

            value = OverridesParser.create().parse_override(arg.lstrip("+")).value()
            entries = [str(v) for v in (value if isinstance(value, list) else [value])]
    if entries is None:
        env = os.environ.get("SMCLM_CONFIG_PATH")
        entries = [env] if env else []
    dirs = [config_dir()]
    for entry in entries:
        if entry.startswith("pkg://"):
            try:
                dirs.append(Path(str(resources.files(entry.removeprefix("pkg://")))))
            except ModuleNotFoundError:
                continue  # Hydra skips it too
        else:
            dirs.append(Path(entry.removeprefix("file://")))
    return dirs


def group_options(group: str, dirs: list[Path] | None = None) -> list[str]:
    """The options of a config group: its YAML files in every search directory."""
    return sorted({p.stem for d in dirs or [config_dir()] for p in (d / group).glob("*.yaml")})


def check_group_overrides(overrides: list[str]) -> None:
    """Reject `group=option` overrides whose option file does not exist (before Hydra runs), in
    the package's configs or the user's search path (:func:`search_dirs`).

    Sweeps (`method=ctl,rl`) are checked option by option.
    """
    dirs = search_dirs(overrides)
    for arg in overrides:
        if "=" not in arg or arg.startswith(("+", "~", "-")):
            continue
        key, value = arg.split("=", 1)
        key = key.removeprefix("override ")
        if key not in GROUPS or value in ("null", ""):
            continue
        options = group_options(key, dirs)
        for opt in value.split(","):
            if opt not in options:
                where = "" if len(dirs) == 1 else f" (searched: {', '.join(map(str, dirs))})"
                raise ConfigError(
                    f"unknown {key} '{opt}'; choose one of: {', '.join(options) or '(none yet)'}"
                    f"{where}"
                )


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: DictConfig, *, training: bool = True) -> None:
    """Check values the sampler and trainer rely on; raise ConfigError with the fix.

    ``training=False`` (eval, sample, collect): a ``train`` section (an experiment's settings
    for ``smclm train``) is not checked, since these commands do not read it."""
    check_ranges(cfg)  # first: it needs no torch (the CLI also runs it before importing torch)
    from smclm.methods import METHODS
    from smclm.smc.resampling import RESAMPLERS  # here: importing config.py needs no torch

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
        method == "none" or method in METHODS or bool(cfg.method.get("_target_")),
        f"unknown method '{method}'; choose one of: {', '.join(sorted(METHODS))}, or give your "
        "learner's method._target_",
    )
    if "optimizer" in cfg:
        lr = cfg.optimizer.lr
        _require(
            isinstance(lr, (int, float)) and lr > 0,
            f"optimizer.lr={lr} must be a positive number (e.g. optimizer.lr=1e-4)",
        )
    if training and "train" in cfg:
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
        cfg.twist.get("_target_") != "smclm.models.loading.build_twist"  # a user's twist
        or cfg.twist.kind in ("none", "head", "separate"),
        f"twist.kind={cfg.twist.get('kind')} must be none, head or separate",
    )
    _require(
        cfg.twist.get("_target_") != "smclm.models.loading.build_twist"
        or cfg.twist.get("output", "vocab") in ("vocab", "embedding"),
        f"twist.output={cfg.twist.get('output')} must be vocab (a V-wide last layer, the "
        "paper's) or embedding (scored against the base LM's output embeddings)",
    )
    _require(
        cfg.evaluator.name in EVALUATORS,
        f"evaluator={cfg.evaluator.name} is not one of: {', '.join(EVALUATORS)}",
    )


# The evaluators of task=latent's test rows: name -> class (built by smclm.evaluate.Evaluator).
LATENT_EVALUATORS = {
    "arithmetic": "smclm.evaluators.arithmetic.ArithmeticEvaluator",
    "overlap": "smclm.evaluators.latent.OverlapEvaluator",
    "label_vote": "smclm.evaluators.latent.LabelVoteEvaluator",
}
EVALUATORS = ("auto", "none", "exact", "bounds", "sentences", *LATENT_EVALUATORS)

# Every numeric (and boolean) key with a range: (key, kind, an example of a valid value). Keys a
# config does not have are skipped; method-specific keys are checked by the methods' constructors.
RANGES: tuple[tuple[str, str, str], ...] = (
    ("seed", "int", "0"),
    ("resume", "bool", "true"),
    ("verbose", "bool", "true"),
    ("n", "int>0", "16"),
    ("train.updates", "int>=0", "64"),
    ("train.eval_every", "int>0", "16"),
    ("train.checkpoint_keep", "int>=0", "2"),  # 0 keeps every checkpoint
    ("train.progress", "bool", "false"),
    ("method.lr", ">0", "1e-4"),  # before optimizer.lr, which defaults to it
    ("optimizer.lr", ">0", "1e-4"),
    ("smc.n_particles", "int>0", "64"),
    ("smc.ess_threshold", "[0,1]", "0.5"),
    ("task.output_len", "int>0", "4"),
    ("task.cond_len", "int>=0", "2"),
    ("task.min_count", "int>=0", "1"),
    ("task.min_len", "int>0", "1"),  # lengths count the stop token
    ("task.epsilon", ">=0", "1e-16"),
    ("task.beta", "finite", "1.0"),
    ("task.threshold", "finite", "-5.0"),
    ("task.target_class", "int>0", "1"),
    ("task.classifier_batch_size", "int>0", "128"),
    ("task.n_train", "int>0", "50"),  # next_sentence: training prompts (lines 1..n_train)
    ("task.n_test", "int>=0", "10"),  # next_sentence: test prompts (the next n_test lines)
    ("task.prompt_index", "int>=0|all", "0"),  # next_sentence: which prompt of task.split
    ("task.tau", ">0", "0.9"),  # next_sentence: the target temperature
    ("task.penalty", "finite", "-50.0"),  # next_sentence: logit penalty on banned tokens
    ("exact_samples.n", "int>0", "256"),
    ("exact_samples.batch_size", "int>0", "4096"),
    ("exact_samples.max_draws", "int>0", "10000000"),
    ("exact_samples.seed", "int", "0"),
    ("evaluator.n_exact", "int>0", "4"),
    ("evaluator.max_sequences", "int>0", "1000000"),
    ("evaluator.n_g_q", "int>0|null", "null"),
    ("evaluator.max_batch_particles", "int>0", "2048"),
    ("evaluator.n_samples", "int>0", "8"),  # evaluator=sentences: samples per test prompt
    ("evaluator.n_prompts", "int>0|null", "5"),  # evaluator=sentences: the first n test prompts
    ("twist.hidden_mult", "int>0", "1"),
    ("twist.n_layers", "int>0", "3"),
)

_KINDS = {
    "int": "an integer",
    "int>0": "a positive integer",
    "int>=0": "a non-negative integer",
    "int>0|null": "null or a positive integer",
    "int>=0|all": "a non-negative integer or all",
    ">0": "a positive number",
    ">=0": "a non-negative number",
    "[0,1]": "a number in [0, 1]",
    "finite": "a finite number",
    "bool": "true or false",
}


def _in_range(value: object, kind: str) -> bool:
    import math

    if kind.endswith("|null"):
        if value is None:
            return True
        kind = kind.removesuffix("|null")
    if kind.endswith("|all"):
        if value == "all":
            return True
        kind = kind.removesuffix("|all")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind.startswith("int"):
        return isinstance(value, int) and (
            kind == "int" or value > 0 or (kind == "int>=0" and value == 0)
        )
    if not math.isfinite(value):
        return False
    return {">0": value > 0, ">=0": value >= 0, "[0,1]": 0 <= value <= 1}.get(kind, True)


def check_ranges(cfg: DictConfig) -> None:
    """Types and ranges of the keys in ``RANGES``, ``threads`` and the list-valued keys."""
    for key, kind, example in RANGES:
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value != "<absent>" and not _in_range(value, kind):
            raise ConfigError(f"{key}={value!r} must be {_KINDS[kind]} (e.g. {key}={example})")
    threads = cfg.get("threads", "auto")
    _require(
        threads == "auto" or _in_range(threads, "int>0"),
        f"threads={threads!r} must be auto or a positive integer (e.g. threads=4)",
    )
    t_eval = cfg.get("output_len")  # smclm eval's
    _require(
        t_eval is None or _in_range(t_eval, "int>0"),
        f"output_len={t_eval!r} must be null (the task's T) or a positive integer: the output "
        "length to evaluate at (e.g. output_len=22)",
    )
    particles = OmegaConf.select(cfg, "evaluator.particles", default=None)
    _require(
        particles is None
        or OmegaConf.is_list(particles)
        and len(particles) > 0
        and all(_in_range(k, "int>0") for k in particles),
        f"evaluator.particles={particles} must be a non-empty list of positive integers "
        "(particle counts K, e.g. evaluator.particles=[32,500])",
    )
    targets = OmegaConf.select(cfg, "task.target_ids", default=None)
    _require(
        targets is None
        or OmegaConf.is_list(targets)
        and all(_in_range(i, "int>=0") for i in targets),
        f"task.target_ids={targets} must be a list of token ids (e.g. task.target_ids=[9])",
    )
    stop = OmegaConf.select(cfg, "task.stop", default=None)
    entries = stop if OmegaConf.is_list(stop) else [stop]
    _require(
        stop is None
        or all((isinstance(e, str) and e != "") or _in_range(e, "int>=0") for e in entries),
        f"task.stop={stop} must be null, a token id, a one-token string or a list of them "
        "(e.g. task.stop=[end] or task.stop=[11])",
    )
    min_len, t_len = (
        OmegaConf.select(cfg, f"task.{k}", default=None) for k in ("min_len", "output_len")
    )
    _require(
        stop is None
        or not _in_range(min_len, "int>0")
        or not _in_range(t_len, "int>0")
        or min_len <= t_len,
        f"task.min_len={min_len} must be at most task.output_len={t_len} (the length cap)",
    )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
