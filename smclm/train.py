"""The training loop: sample → loss → step, evaluating, logging and checkpointing on a schedule.

Reads top to bottom: build everything from the config, restore a checkpoint if resuming, evaluate
before the first update, then update until ``train.updates``, evaluating (and checkpointing) at
the scheduled steps. SIGTERM/SIGINT finish the current update, save a checkpoint and exit; any
other failure also saves the last completed step before it propagates. On the CPU a resumed run
ends with exactly the parameters and metrics of an uninterrupted one: the sampling generator,
the global RNG and the optimiser state are checkpointed, and evaluation draws from its own
generator seeded by (seed, step).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from smclm.build import build_world, exact_pool
from smclm.checkpoint import latest_checkpoint, load_state, load_twist, save_checkpoint
from smclm.config import validate
from smclm.errors import UserError
from smclm.evaluate import Evaluator
from smclm.methods import build_method
from smclm.methods.base import TrainContext
from smclm.tracking import Tracker, write_json_atomic


class Interrupted(Exception):
    """Raised after a checkpoint was saved in response to SIGTERM/SIGINT."""

    def __init__(self, signum: int, step: int, ckpt: Path) -> None:
        super().__init__(
            f"stopped by signal {signum} after update {step}; checkpoint {ckpt}; "
            "re-run the same command with resume=true to continue"
        )
        self.signum = signum


def eval_steps(updates: int, schedule: str, every: int) -> set[int]:
    """Updates after which to evaluate: always 0 and the last; then every `every` or 2, 4, 8, …"""
    if schedule == "exponential":
        steps = {2**k for k in range(1, updates.bit_length() + 1) if 2**k <= updates}
    else:
        steps = set(range(every, updates + 1, every))
    return steps | {0, updates}


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    return {"generator": gen.get_state(), "torch": torch.random.get_rng_state()}


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    gen.set_state(state["generator"])
    torch.random.set_rng_state(state["torch"])


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train twists as configured; write config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not cfg.resume:
        raise UserError(
            f"{run_dir} already holds checkpoints; pass resume=true to continue that "
            "run, or choose another hydra.run.dir"
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    world = build_world(cfg)
    model, task = world.model, world.task
    method = build_method(
        cfg.method.name,
        **{k: v for k, v in cfg.method.items() if k not in ("name", "lr", "twist_squash")},
    )
    evaluator = Evaluator(cfg, world, None)  # checks enumerability before any sampling
    pool = exact_pool(cfg, world) if method.needs_exact or evaluator.needs_pool else None
    evaluator.pool = pool
    if model.twist is None or not any(p.requires_grad for p in model.twist.parameters()):
        raise UserError("smclm train needs a trainable twist; set twist=mlp, linear or separate")
    params = [p for p in model.twist.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(cfg.optimizer.lr), betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator(device=world.device).manual_seed(int(cfg.seed))

    step = 0
    if ckpt is not None:
        state = load_state(ckpt)
        load_twist(ckpt, model.twist)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(gen, state["rng"])
        step = int(state["step"])
    tracker = Tracker(run_dir, cfg.logger, cfg, resume_step=step if ckpt is not None else None)
    batch = TrainContext(model, task, int(cfg.smc.n_particles), gen, cfg.smc.resampling, pool)
    updates = int(cfg.train.updates)
    schedule = eval_steps(updates, cfg.train.schedule, int(cfg.train.eval_every))

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir,
            step,
            model.twist,
            optimizer,
            _rng_state(gen),
            resolved,
            keep=int(cfg.train.checkpoint_keep),
        )

    stop: list[int] = []
    handlers = {
        s: signal.signal(s, lambda signum, _: stop.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    last_eval: dict[str, Any] = {}
    last_train: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(
        total=updates,
        initial=step,
        desc=f"{cfg.method.name} on {task.name}",
        disable=not cfg.train.progress,
        dynamic_ncols=True,
    )
    try:
        if ckpt is None:  # the first evaluation always runs before any update
            last_eval = _evaluate(evaluator, tracker, step)
            checkpoint()
        while step < updates:
            t0 = time.perf_counter()
            loss, metrics = method.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            last_train = {**metrics, "time/update_s": time.perf_counter() - t0}
            tracker.log(step, last_train)
            if step in schedule:
                last_eval = _evaluate(evaluator, tracker, step)
                checkpoint()
            bar.update(1)
            bar.set_postfix(_postfix(last_train, last_eval))
            if stop:
                raise Interrupted(stop[0], step, checkpoint())
    except Interrupted:
        raise
    except BaseException:
        if step > 0:
            checkpoint()  # nothing lost: the last completed update is saved
        raise
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        tracker.close()

    summary = {
        **last_train,
        **last_eval,
        "run/task": task.name,
        "run/method": cfg.method.name,
        "run/seed": int(cfg.seed),
        "run/updates": step,
        "time/total_s": time.perf_counter() - started,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _evaluate(evaluator: Evaluator, tracker: Tracker, step: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    metrics = evaluator(step)
    if metrics:
        metrics["time/eval_s"] = time.perf_counter() - t0
        tracker.log(step, metrics)
    return metrics


def _postfix(train: dict[str, float], ev: dict[str, Any]) -> dict[str, str]:
    out = {}
    if "train/loss" in train:
        out["loss"] = f"{train['train/loss']:.4g}"
    for key, short in (("kl/sigma_q_exact", "KL(σ‖q)"), ("kl/sigma_q", "KL(σ‖q)~")):
        if key in ev and isinstance(ev[key], float):
            out[short] = f"{ev[key]:.3f}"
            break
    return out
