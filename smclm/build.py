"""From a config to objects: the base model, the twist, the task, the exact-sample pool.

The only module besides the entry points that reads a DictConfig; everything it returns is plain
tensors, modules and small dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from smclm.errors import ConfigError, UserError
from smclm.lengths import check_context
from smclm.models.loading import build_twist, load_base_model, resolve_device, resolve_dtype
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.base import Task


@dataclass
class World:
    model: TwistedLM
    tokenizer: Any
    task: Task
    device: torch.device


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


def encode_prompt(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of the prompt, without special tokens: [P]."""
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except Exception as e:  # the toy tokenizer raises on unknown words
        raise ConfigError(f"task.prompt={text!r} cannot be tokenised ({e}); use known words") from e
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids:
        raise ConfigError("task.prompt is empty; the sampler needs at least one prompt token")
    if unk is not None and unk in ids:
        raise ConfigError(f"task.prompt={text!r} contains words the tokenizer does not know")
    return torch.tensor(ids, dtype=torch.long)


def build_task(
    task_cfg: DictConfig, tokenizer: Any, base: torch.nn.Module, device: torch.device
) -> Task:
    """The task of ``task_cfg``: toy, toxicity, sentiment or infilling."""
    name = task_cfg.name
    prompt = encode_prompt(tokenizer, task_cfg.prompt)
    t_len = int(task_cfg.output_len)
    vocab_size = int(base.get_output_embeddings().weight.shape[0])
    try:
        if name == "toy":
            from smclm.tasks.toy import build_toy_task

            return build_toy_task(
                prompt,
                t_len,
                task_cfg.potential,
                list(task_cfg.target_ids),
                vocab_size,
                min_count=int(task_cfg.min_count),
                epsilon=float(task_cfg.epsilon),
                beta=float(task_cfg.beta),
            )
        if name in ("toxicity", "sentiment"):
            from smclm.tasks.classifier import TextClassifier, load_classifier

            dtype = resolve_dtype(str(task_cfg.get("classifier_dtype", "auto")), device)
            clf_model, clf_tok = load_classifier(str(task_cfg.classifier), device, dtype)
            clf = TextClassifier(
                clf_model,
                clf_tok,
                tokenizer,
                prompt,
                batch_size=int(task_cfg.get("classifier_batch_size", 128)),
            )
            beta = float(task_cfg.beta)
            if name == "toxicity":
                from smclm.tasks.toxicity import ToxicityPotential

                pot = ToxicityPotential(
                    clf,
                    str(task_cfg.potential),
                    threshold=float(task_cfg.threshold),
                    beta=beta,
                    epsilon=float(task_cfg.epsilon),
                )
            else:
                from smclm.tasks.sentiment import SentimentPotential

                pot = SentimentPotential(clf, task_cfg.target_class, beta)
            uses_beta = name == "sentiment" or task_cfg.potential == "class_logprob"
            return Task(
                name, prompt, t_len, pot, log_phi_max=pot.log_max(), beta=beta if uses_beta else 1.0
            )
        if name == "infilling":
            from smclm.tasks.infilling import InfillingPotential

            c = int(task_cfg.cond_len)
            if c < 1:
                raise ValueError(f"task.cond_len={c} must be at least 1 for infilling")
            return Task(name, prompt, t_len, InfillingPotential(base, prompt), None, cond_len=c)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    raise ConfigError(f"unknown task '{name}'; choose one of: toy, toxicity, sentiment, infilling")


def build_world(cfg: DictConfig) -> World:
    """Load p₀, build the twist of ``cfg.twist`` and the task. Seeds torch first."""
    torch.manual_seed(int(cfg.seed))
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
    set_threads(cfg.get("threads", "auto"), base, device)
    squash = cfg.method.get("twist_squash") or cfg.twist.squash
    # Policy learners (PPO, GFlowNet) have no twists, except a SubTB GFlowNet whose flow head is
    # the twist (baselines-spec B4.3/B5): its intermediate targets for SMC.
    kind = cfg.twist.kind
    if cfg.method.get("policy") and cfg.method.get("loss") != "subtb":
        kind = "none"
    try:
        twist = build_twist(
            kind,
            base,
            head=cfg.twist.head,
            hidden_mult=int(cfg.twist.hidden_mult),
            n_layers=int(cfg.twist.n_layers),
            squash=squash,
            conditional=bool(cfg.task.get("cond_len", 0)),
            dtype=resolve_dtype(str(cfg.twist.dtype), device),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    policy = build_policy_from_config(cfg, base, device)
    model = TwistedLM(base, twist, policy)
    task = build_task(cfg.task, tokenizer, base, device)
    check_context(base, task, str(cfg.model.name))  # prompt + T (+ c) fit, before any sampling
    return World(model, tokenizer, task, device)


# method.* keys that configure the world (the policy), not the learner's constructor
METHOD_WORLD_KEYS = (
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
) -> torch.nn.Module | None:
    """The proposal policy of ``method.policy`` (PPO, GFlowNet), or None for twist learners."""
    kind = cfg.method.get("policy")
    if not kind:
        return None
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

    if not cfg.get("run"):
        validate(cfg)
        return build_world(cfg), cfg, None
    ckpt = find_checkpoint(cfg.run, cfg.get("checkpoint"))
    run_cfg = OmegaConf.load(Path(cfg.run) / "config.yaml")
    for key in command_keys:
        if key in cfg:
            run_cfg[key] = cfg[key]
    validate(run_cfg)
    world = build_world(run_cfg)
    load_params(ckpt, world.model.trainables())
    return world, run_cfg, ckpt
