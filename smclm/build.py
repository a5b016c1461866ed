"""From a config to objects: the learner, the base model, the twist, the task, the exact pool.

The only module besides the entry points that reads a DictConfig; everything it returns is plain
tensors, modules and small dataclasses. Tasks, twists and learners are built by the ``_target_``
of their config (built-in ones and users' plugins alike); nothing here branches on a name: a
learner declares what it needs (a twist, a policy, exact samples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from smclm.errors import ConfigError, UserError
from smclm.lengths import check_context
from smclm.models.loading import (
    auto_cpu_dtype,
    dtype_name,
    load_base_model,
    prompt_prefix,
    resolve_device,
    resolve_dtype,
)
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass
class World:
    model: TwistedLM
    tokenizer: Any
    task: Task
    device: torch.device
    learner: Any = None  # the method's learner (None for method=none), built first: its needs


def set_threads(threads: object, base: torch.nn.Module, device: torch.device) -> None:
    """``auto``: one CPU thread for tiny models (thread start-up costs more than their matmuls,
    ~10x on a 2-core machine), torch's default otherwise; an integer sets it."""
    if device.type != "cpu":
        return
    if threads == "auto":
        if sum(p.numel() for p in base.parameters()) < 5_000_000:
            torch.set_num_threads(1)
    elif isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)
    else:
        raise ConfigError(f"threads={threads} must be auto or a positive integer")


def encode_prompt(tokenizer: Any, text: str, bos: bool = False) -> torch.Tensor:
    """Token ids of the text, without special tokens: [P]. bos: the task prompt starts with the
    BOS token when the tokenizer adds one to text (:func:`smclm.models.loading.prompt_prefix`:
    Llama 2/3 yes; GPT-2, GPT-Neo, SmolLM2 no); conditioning text o never does."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as e:  # the toy tokenizer raises on unknown words
        raise ConfigError(f"task.prompt={text!r} cannot be tokenised ({e}); use known words") from e
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids:
        raise ConfigError("task.prompt is empty; the sampler needs at least one prompt token")
    if unk is not None and unk in ids:
        raise ConfigError(f"task.prompt={text!r} contains words the tokenizer does not know")
    if bos:
        ids = prompt_prefix(tokenizer) + list(ids)
    return torch.tensor(ids, dtype=torch.long)


def instantiate_node(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Hydra-instantiate the config ``node`` (at ``key``) by its ``_target_``; ``kwargs`` are the
    runtime objects it receives. Failures are one line naming the key (no traceback)."""
    import re

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_")
    if not target:
        raise ConfigError(
            f"{key} has no _target_; name the function or class that builds it, e.g. "
            f"{key}._target_=my_package.my_module.build (a run's config.yaml written before "
            f"smclm named its builders needs the _target_ of configs/{key}/<name>.yaml added)"
        )
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        keys = ", ".join(m if m.startswith(f"{key}.") else f"{key}.{m}" for m in missing)
        raise ConfigError(f"{keys} must be set (it is ??? in the config); give a value")
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        located = re.match(r"Error locating target '([^']+)'", str(e))
        if located:
            lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
            detail = lines[1] if len(lines) > 1 else str(cause)
            quoted = re.match(r"\w+\((['\"])(.*)\1\)$", detail)  # ModuleNotFoundError("…")
            detail = quoted.group(2) if quoted else detail
            raise ConfigError(
                f"{key}: cannot import {located.group(1)} ({detail}); check the "
                "dotted path, and that its package is installed or on PYTHONPATH"
            ) from e
        if cause is not None and not isinstance(cause, (ValueError, TypeError)):
            raise cause from None  # a bug in the plugin, not a bad value: its traceback
        what = str(cause) if cause is not None else str(e).splitlines()[-1]
        raise ConfigError(f"{key} ({target}): {what.strip().splitlines()[0]}") from e
    except (ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(f"{key} ({target}): {str(e).strip().splitlines()[0]}") from e


def build_task(
    task_cfg: DictConfig, tokenizer: Any, base: torch.nn.Module, device: torch.device
) -> Task:
    """The task of ``task_cfg``, built by its ``_target_`` (see :mod:`smclm.tasks.plugin`):
    ``builder(env, name=…, prompt=…, output_len=…, …)``."""
    from smclm.tasks.plugin import TaskEnv

    text = task_cfg.get("prompt")
    # task.prompt=null: the builder makes its own prompts (task=latent: one per data row)
    ids = (
        torch.zeros(0, dtype=torch.long)
        if text is None
        else encode_prompt(tokenizer, text, bos=True)
    )
    env = TaskEnv(tokenizer, base, device, ids)
    task = instantiate_node(task_cfg, "task", env=env)
    if not isinstance(task, Task):
        raise ConfigError(
            f"task._target_={task_cfg._target_} returned a {type(task).__name__}, not a "
            "smclm.tasks.base.Task; a task builder returns a Task"
        )
    if task.output_len != int(task_cfg.output_len) or task.cond_len != int(
        task_cfg.get("cond_len", 0)
    ):
        raise ConfigError(
            f"task._target_={task_cfg._target_} built T={task.output_len}, c={task.cond_len} "
            f"but the config says task.output_len={task_cfg.output_len}, "
            f"task.cond_len={task_cfg.get('cond_len', 0)}; the builder must use them"
        )
    return task


def build_learner(cfg: DictConfig) -> Any:
    """The learner of ``cfg.method`` by its ``_target_`` (None without one: ``method=none``);
    the method's keys except ``METHOD_WORLD_KEYS`` are its constructor's options."""
    from smclm.methods import build_method

    m = cfg.method
    if not m.get("_target_"):  # method=none: evaluating or sampling an untrained model
        return None
    options = {
        k: v
        for k, v in OmegaConf.to_container(m, resolve=True).items()  # type: ignore[union-attr]
        if k not in METHOD_WORLD_KEYS
    }
    return build_method(str(m.get("name")), m.get("_target_"), **options)


def build_twist_from_config(
    cfg: DictConfig, base: torch.nn.Module, device: torch.device
) -> torch.nn.Module | None:
    """The twist of ``cfg.twist`` by its ``_target_``, called with the frozen ``base``,
    ``conditional`` (the task has o), ``dtype`` (from twist.dtype) and ``squash`` (the method's
    ``twist_squash`` where it sets one) besides the config's own keys."""
    node = cfg.twist
    squash = cfg.method.get("twist_squash") or node.get("squash")
    extra: dict[str, Any] = {
        "base": base,
        "conditional": bool(cfg.task.get("cond_len", 0)),
        "dtype": resolve_dtype(str(node.get("dtype", "float32")), device),
    }
    if squash is not None or "squash" in node:
        extra["squash"] = squash
    return instantiate_node(node, "twist", **extra)


def build_world(cfg: DictConfig) -> World:
    """Load p₀, build the learner, then what it needs (:func:`smclm.methods.needs`): the twist
    of ``cfg.twist``, the policy of ``method.policy``; then the task. Seeds torch first.
    ``model.dtype=auto`` is decided here (on a CPU by :func:`auto_cpu_dtype`, logged in one
    line); the dtype used is set in ``cfg.model.dtype_resolved``."""
    from smclm.methods import needs

    torch.manual_seed(int(cfg.seed))
    learner = build_learner(cfg)
    need = needs(learner)
    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.model.dtype), device)
    toy = OmegaConf.to_container(cfg.model.toy) if "toy" in cfg.model else None
    gguf = cfg.model.get("gguf_file")
    base, tokenizer = load_base_model(
        str(cfg.model.name),
        dtype,
        device,
        toy,  # type: ignore[arg-type]
        gguf_file=None if gguf is None else str(gguf),
    )
    if str(cfg.model.dtype) == "auto":
        if device.type == "cpu":
            dtype, why = auto_cpu_dtype(base, tokenizer)
        else:
            why = "a GPU that supports it" if dtype == torch.bfloat16 else "no bfloat16 here"
        log.info("model.dtype=auto: %s (%s)", dtype_name(dtype), why)
    with open_dict(cfg.model):  # the dtype this run used, in its config.yaml
        cfg.model.dtype_resolved = dtype_name(dtype)
    set_threads(cfg.get("threads", "auto"), base, device)
    twist = build_twist_from_config(cfg, base, device) if need.twist else None
    policy = build_policy_from_config(cfg, base, device) if need.policy else None
    model = TwistedLM(base, twist, policy)
    task = build_task(cfg.task, tokenizer, base, device)
    if task.logit_bias is not None:  # the task's p̃₀ ∝ exp(logits + b), for p₀ and the policy
        model.set_logit_bias(task.logit_bias)
    if task.tool is not None:  # forced steps of p₀ and every proposal (task.calculator)
        model.set_tool(task.tool)
    check_context(base, task, str(cfg.model.name))  # prompt + T (+ c) fit, before any sampling
    return World(model, tokenizer, task, device, learner)


# method.* keys that configure the world (the policy) or name the learner, not its options
METHOD_WORLD_KEYS = (
    "_target_",
    "name",
    "lr",
    "twist_squash",
    "policy",
    "policy_head",
    "lora",
    "policy_dtype",
    "particles_per_cond",  # conditional tasks: rows per o in an update (paper CTL: 25 o × 4)
)


def build_policy_from_config(
    cfg: DictConfig, base: torch.nn.Module, device: torch.device
) -> torch.nn.Module:
    """The proposal policy of ``method.policy``, for a learner that needs one (PPO, GFlowNet)."""
    kind = cfg.method.get("policy")
    if not kind:
        raise ConfigError(
            f"method {cfg.method.get('name')} trains a policy; set "
            "method.policy=full|mlp_head|separate_conditional|lora"
        )
    from smclm.models.policy import build_policy

    head = cfg.method.get("policy_head") or {}
    lora = cfg.method.get("lora") or {}
    try:
        return build_policy(
            str(kind),
            base,
            conditional=bool(cfg.task.get("cond_len", 0)),
            hidden_mult=int(head.get("hidden_mult", 1)),
            n_layers=int(head.get("n_layers", 3)),
            lora_r=int(lora.get("r", 64)),
            lora_alpha=float(lora.get("alpha", 16.0)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            lora_targets=list(lora["targets"]) if lora.get("targets") else None,
            dtype=resolve_dtype(str(cfg.method.get("policy_dtype", "float32")), device),
        )
    except ValueError as e:
        raise ConfigError(f"method.policy={kind}: {e}") from e


def exact_sample_settings(cfg: DictConfig) -> dict:
    """Everything the exact-sample pool depends on (the cache key)."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    task = OmegaConf.to_container(cfg.task, resolve=True)
    from smclm.models.gguf import file_key, resolve_gguf, smclm_cache_dir

    gguf = resolve_gguf(str(cfg.model.name), cfg.model.get("gguf_file"))
    if gguf is not None and gguf.is_file():  # a GGUF's weights are its contents, not its name
        model["gguf_contents"] = file_key(gguf, smclm_cache_dir())
    return {
        "model": model,
        "task": task,
        "seed": int(cfg.exact_samples.seed),
        "n": int(cfg.exact_samples.n),
    }


def exact_pool(cfg: DictConfig, world: World) -> torch.Tensor:
    """The exact target sample pool for this model and task, from the cache or collected now:
    [M, T], or [M, T + c] (s, o) pairs for a conditional task (see ``split_pool``).

    Call it only when something needs exact samples; raises a UserError with the fix when
    there can be no pool.
    """
    src = cfg.exact_samples.source
    task = world.task
    if src == "none" or (task.log_phi_max is None and not task.cond_len):
        why = (
            "exact_samples.source=none"
            if src == "none"
            else f"task '{task.name}' has no bounded potential for rejection sampling"
        )
        raise UserError(
            f"this run needs exact target samples but there is no pool ({why}); set "
            "exact_samples.source=auto, or use method.positives and an evaluator that need none"
        )
    from smclm.tasks.exact_samples import load_or_collect, rejection_sample

    settings = exact_sample_settings(cfg)
    gen = torch.Generator(device=world.device).manual_seed(int(cfg.exact_samples.seed) + 7919)

    def collect() -> torch.Tensor:
        if src == "cache":
            raise UserError(
                "no cached exact samples for these settings; run `smclm collect` with "
                "the same task/model/seed, or set exact_samples.source=auto"
            )
        if task.cond_len:  # joint sampling: rows are [s_1:T, o_1:c], exact for their own o
            s, o = task.sample_joint(world.model, int(cfg.exact_samples.n), gen)
            return torch.cat([s, o], dim=1)
        return rejection_sample(
            world.model,
            task,
            int(cfg.exact_samples.n),
            batch_size=int(cfg.exact_samples.batch_size),
            generator=gen,
            max_draws=int(cfg.exact_samples.max_draws),
            progress=True,
        )

    samples, _ = load_or_collect(cfg.exact_samples.cache_dir, settings, collect)
    return samples.to(world.device)


def split_pool(task: Task, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(s [M, T], o [M, c] or None) from an exact pool."""
    t_len = task.output_len
    if not task.cond_len:
        return pool, None
    return pool[:, :t_len], pool[:, t_len : t_len + task.cond_len]


def world_for(cfg: DictConfig, command_keys: tuple[str, ...]) -> tuple[World, DictConfig, Any]:
    """The world a command works on: the configured one, or with ``run=<dir>`` the run's own
    (its config fixes model, task, twist and policy; the command's ``command_keys`` settings
    win) with the chosen or newest checkpoint loaded. Returns (world, config, checkpoint|None)."""
    from pathlib import Path

    from smclm.checkpoint import find_checkpoint, load_params
    from smclm.config import validate

    t_len = cfg.get("output_len")  # eval's output_len=: this T instead of the task's
    if not cfg.get("run"):
        if t_len is not None:
            cfg.task.output_len = t_len
        validate(cfg, training=False)
        return build_world(cfg), cfg, None
    ckpt = find_checkpoint(cfg.run, cfg.get("checkpoint"))
    run_cfg = OmegaConf.load(Path(cfg.run) / "config.yaml")
    run_particles = run_cfg.smc.n_particles
    for key in command_keys:
        if key in cfg:
            run_cfg[key] = cfg[key]
    # sample (n=) and eval (evaluator.particles) choose their own particle counts: the run's
    # smc.n_particles stays, so that its training settings (method.particles_per_cond) validate
    run_cfg.smc.n_particles = run_particles
    if t_len is not None:  # the twist and policy heads do not depend on T
        run_cfg.task.output_len = t_len
    validate(run_cfg, training=False)
    world = build_world(run_cfg)
    load_params(ckpt, world.model.trainables())
    return world, run_cfg, ckpt
