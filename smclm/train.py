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
from smclm.checkpoint import latest_checkpoint, load_params, load_state, save_checkpoint
from smclm.compute import ComputeMeter
from smclm.config import validate
from smclm.errors import UserError
from smclm.evaluate import Evaluator
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
    method = world.learner  # built first by build_world: what it needs shapes the world
    evaluator = Evaluator(cfg, world, None)  # checks enumerability before any sampling
    if resolved["evaluator"]["name"] != evaluator.name:  # evaluator=auto: record the choice
        resolved["evaluator"]["name"] = evaluator.name
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    conditional = task.cond_len > 0
    pool = None
    if method.needs_exact or evaluator.needs_pool or conditional:
        pool = exact_pool(cfg, world)
    evaluator.pool = pool
    trainables = model.trainables()
    if not any(p.requires_grad for p in trainables.parameters()):
        raise UserError(
            "smclm train needs something to train: a twist (twist=mlp, linear or separate) "
            "or a policy (method=ppo|gfn)"
        )
    gen = torch.Generator(device=world.device).manual_seed(int(cfg.seed))
    lr = float(cfg.optimizer.lr)
    k = int(cfg.smc.n_particles)
    group = int(cfg.method.get("particles_per_cond", 1)) if conditional else None
    batch = TrainContext(
        model,
        task,
        k,
        gen,
        cfg.smc.resampling,
        None if conditional else pool,
        group_size=group,
    )
    meter = ComputeMeter()
    meter.watch("base", model.base.base_model)
    meter.watch("twist", model.twist)
    meter.watch("policy", model.policy)
    meter.watch_task(task)
    batch.meter = meter
    owns_update = hasattr(method, "update")
    if owns_update:
        meter.begin()
        method.setup(batch, lr)  # e.g. GFlowNet's pilot batch: counted in the totals
        meter.end()
        for name, mod in method.extra_modules().items():
            meter.watch(name, mod)
        optimizer = None
    else:
        params = [p for p in trainables.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)

    step = 0
    if ckpt is not None:
        state = load_state(ckpt)
        load_params(ckpt, trainables)
        if owns_update:
            method.load_state_dict(state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(gen, state["rng"])
        meter.load_state_dict(state["extra"].get("compute", {}))
        step = int(state["step"])
    tracker = Tracker(run_dir, cfg.logger, cfg, resume_step=step if ckpt is not None else None)
    updates = int(cfg.train.updates)
    schedule = eval_steps(updates, cfg.train.schedule, int(cfg.train.eval_every))

    def checkpoint() -> Path:
        return save_checkpoint(
            run_dir,
            step,
            trainables,
            method.state_dict() if owns_update else optimizer,
            _rng_state(gen),
            resolved,
            keep=int(cfg.train.checkpoint_keep),
            extra={"compute": meter.state_dict()},
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
            last_eval = _evaluate(evaluator, tracker, step, meter)
            checkpoint()
        while step < updates:
            t0 = time.perf_counter()
            meter.begin()
            if conditional:
                _draw_conditioning(batch, cfg, world)
            if owns_update:
                metrics = method.update(batch)
            else:
                loss, metrics = method.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            step += 1
            last_train = {**metrics, **meter.end(), "time/update_s": time.perf_counter() - t0}
            tracker.log(step, last_train)
            if step in schedule:
                last_eval = _evaluate(evaluator, tracker, step, meter)
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
        meter.close()

    summary = {
        **last_train,
        **last_eval,
        **meter.totals(),
        "run/task": task.name,
        "run/method": cfg.method.name,
        "run/evaluator": evaluator.name,
        "run/seed": int(cfg.seed),
        "run/updates": step,
        "time/total_s": time.perf_counter() - started,
    }
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def _draw_conditioning(batch: TrainContext, cfg: DictConfig, world: Any) -> None:
    """Conditional tasks: fresh (s, o) pairs from p₀ for this update (joint sampling), each o
    shared by ``group_size`` consecutive rows; ``exact_pool`` holds the exact s of each row."""
    group = batch.group_size or 1
    task, n_pairs = world.task, batch.n_particles // group
    with torch.no_grad():
        s, o = task.sample_joint(world.model, n_pairs, batch.generator)
    if batch.meter is not None:
        batch.meter.sampled(n_pairs * (task.output_len + task.cond_len))
    batch.cond = o.repeat_interleave(group, dim=0)
    batch.exact_pool = s.repeat_interleave(group, dim=0)


def _evaluate(
    evaluator: Evaluator, tracker: Tracker, step: int, meter: ComputeMeter
) -> dict[str, Any]:
    t0 = time.perf_counter()
    metrics = evaluator(step)
    if metrics:
        metrics["time/eval_s"] = time.perf_counter() - t0
        # the running compute totals at this evaluation: `smclm table --at` compares methods at
        # equal compute by picking each run's last evaluation within a budget
        metrics.update(meter.totals())
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
