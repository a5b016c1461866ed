"""The training loop: sample → loss → step, evaluating, logging and checkpointing on a schedule.

Reads top to bottom: decide how to start (fresh, resume, or nothing to do) before anything loads,
build everything from the config, restore the checkpoint if resuming, evaluate before the first
update, then update until ``train.updates``, evaluating (and checkpointing) at the scheduled
steps. SIGTERM/SIGINT finish the current update, save a checkpoint and exit; any other failure
also saves the last completed step before it propagates. On the CPU a resumed run ends with
exactly the parameters and metrics of an uninterrupted one: the sampling generator, the global
RNG and the optimiser state are checkpointed, and evaluation draws from its own generator seeded
by (seed, step).

``resume=true`` (see :func:`smclm.resume.resume_point`): a run already at ``train.updates`` is left untouched
(one line, exit 0); a larger ``train.updates`` continues it; a config that would train or measure
something else is refused before anything loads; an empty or missing run dir starts fresh; an
unreadable newest checkpoint falls back to the previous kept one.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from smclm.build import build_world, exact_pool
from smclm.checkpoint import load_params, save_checkpoint, set_aside
from smclm.compute import ComputeMeter
from smclm.config import validate
from smclm.envinfo import write_env
from smclm.errors import UserError
from smclm.evaluate import Evaluator
from smclm.methods.base import TrainContext
from smclm.resume import ResumePoint, complete, refusal, resume_point
from smclm.tracking import Tracker, read_metrics, write_json_atomic


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
    return {
        "generator": gen.get_state(),
        "torch": torch.random.get_rng_state(),
        "device": gen.device.type,
    }


def _set_rng_state(gen: torch.Generator, state: dict[str, Any]) -> None:
    saved = state.get("device", gen.device.type)
    if saved != gen.device.type:
        raise UserError(
            f"the checkpoint holds the random state of a {saved} run but this one runs on "
            f"{gen.device.type}; resume it with device={saved}"
        )
    gen.set_state(state["generator"])
    torch.random.set_rng_state(state["torch"])


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train twists as configured; write config.yaml, metrics.jsonl, summary.json, checkpoints/.

    Returns the summary (a :class:`Finished` one, unchanged on disk, when a resume found the
    run complete)."""
    validate(cfg)
    run_dir = Path(run_dir)
    start = resume_point(cfg, run_dir)  # every refusal comes before anything loads
    updates = int(cfg.train.updates)
    if start is not None and start.step == updates and start.evaluated:
        return complete(run_dir, start)

    world = build_world(cfg)
    model, task = world.model, world.task
    saved_dtype = start.saved["model"].get("dtype_resolved") if start is not None else None
    if saved_dtype is not None and saved_dtype != cfg.model.dtype_resolved:
        print(
            f"smclm: model.dtype={cfg.model.dtype} is {cfg.model.dtype_resolved} here; the run "
            f"was trained so far in {saved_dtype}",
            file=sys.stderr,
        )
    method = world.learner  # built first by build_world: what it needs shapes the world
    evaluator = Evaluator(cfg, world, None)  # checks enumerability; resolves evaluator=auto
    resolved = OmegaConf.to_container(cfg, resolve=True)  # with the evaluator chosen
    saved_evaluator = start.saved["evaluator"]["name"] if start is not None else evaluator.name
    if saved_evaluator != evaluator.name:  # evaluator=auto chose another one than the run's
        raise UserError(refusal(run_dir, [("evaluator.name", saved_evaluator, evaluator.name)]))
    conditional = task.cond_len > 0
    rotating = len(task.train_prompts) > 1  # a prompt drawn per update (_draw_prompt)
    if rotating and (method.needs_exact or evaluator.needs_pool or conditional):
        needs = "exact target samples" if not conditional else "conditioning pairs"
        raise UserError(
            f"training draws from {len(task.train_prompts)} prompts (task.prompt_index=all), "
            f"but the method or evaluator needs {needs} of one prompt; train on one prompt "
            "(task.prompt_index=<i>), or use sampled positives and evaluator=sentences|none"
        )
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

    schedule = eval_steps(updates, cfg.train.schedule, int(cfg.train.eval_every))
    step = eval_step = 0
    if start is not None:
        step, eval_step = _restore(start, trainables, method, optimizer, gen, meter)
    # Files change only from here on: the run is going ahead.
    run_dir.mkdir(parents=True, exist_ok=True)
    for bad in start.unreadable if start is not None else []:
        print(f"smclm: {bad} kept as {set_aside(bad)}", file=sys.stderr)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_env(run_dir, world.device)
    tracker = Tracker(run_dir, cfg.logger, cfg, resume_step=None if start is None else step)
    last_eval: dict[str, Any] = {}
    last_train = _update_record(run_dir, step) if start is not None else {}
    saved_step = step if start is not None else -1

    def checkpoint() -> Path:
        nonlocal saved_step
        saved_step = step
        return save_checkpoint(
            run_dir,
            step,
            trainables,
            method.state_dict() if owns_update else optimizer,
            _rng_state(gen),
            resolved,
            keep=int(cfg.train.checkpoint_keep),
            extra={"compute": meter.state_dict(), "eval_step": eval_step},
        )

    def evaluate() -> dict[str, Any]:
        nonlocal eval_step
        out = _evaluate(evaluator, tracker, step, meter)
        eval_step = step
        return out

    stop: list[int] = []
    handlers = {
        s: signal.signal(s, lambda signum, _: stop.append(signum))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    started = time.perf_counter()
    bar = tqdm(
        total=updates,
        initial=step,
        desc=f"{cfg.method.name} on {task.name}",
        disable=not cfg.train.progress,
        dynamic_ncols=True,
    )
    try:
        # the first evaluation always runs before any update; a run stopped during a scheduled
        # evaluation (its checkpoint says so) repeats it
        if start is None or (step in schedule and eval_step != step):
            last_eval = evaluate()
            checkpoint()
        while step < updates:
            t0 = time.perf_counter()
            meter.begin()
            if conditional:
                _draw_conditioning(batch, cfg, world)
            if rotating:
                _draw_prompt(batch, task)
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
                last_eval = evaluate()
                checkpoint()
            bar.update(1)
            bar.set_postfix(_postfix(last_train, last_eval))
            if stop and step < updates:  # at the last update the run is done: finish it
                raise Interrupted(stop[0], step, checkpoint())
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
        write_json_atomic(run_dir / "summary.json", summary)  # signals still wait for this
    except Interrupted:
        raise
    except BaseException:
        if step > saved_step:
            checkpoint()  # nothing lost: the last completed update is saved
        raise
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        tracker.close()
        meter.close()
    return summary


def _update_record(run_dir: Path, step: int) -> dict[str, Any]:
    """The metrics that update ``step`` logged (what the summary reports as the last update's)."""
    for row in read_metrics(run_dir):
        if row.get("step") == step and "time/update_s" in row:
            return {k: v for k, v in row.items() if k != "step"}
    return {}


def _restore(
    start: ResumePoint,
    trainables: torch.nn.Module,
    method: Any,
    optimizer: torch.optim.Optimizer | None,
    gen: torch.Generator,
    meter: ComputeMeter,
) -> tuple[int, int]:
    """Load the checkpoint into the built run; returns (step, the step last evaluated)."""
    state = start.state
    _set_rng_state(gen, state["rng"])
    load_params(start.ckpt, trainables)
    if optimizer is None:
        method.load_state_dict(state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    meter.load_state_dict(state["extra"].get("compute", {}))
    return start.step, start.eval_step


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


def _draw_prompt(batch: TrainContext, task: Any) -> None:
    """Tasks with several training prompts: this update's prompt, drawn uniformly with the run's
    generator (so a resumed run draws the same ones); all K particles share it, as the
    GFlowNet paper's micro-batches do."""
    gen = batch.generator
    i = int(torch.randint(len(task.train_prompts), (), generator=gen, device=gen.device))
    batch.task = task.for_prompt(task.train_prompts[i])
    if batch.meter is not None:
        batch.meter.watch_task(batch.task)


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
