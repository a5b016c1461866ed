"""Evaluation of a twisted proposal: exact (enumeration) and/or estimated (bounds, KL), or the
sentence-continuation metrics of the run's sampler (``evaluator=sentences``,
:mod:`smclm.evaluators.sentences`).

``run_evaluation`` is what the trainer calls on its schedule; ``evaluate(cfg)`` is `smclm eval`:
a trained run's checkpoint (``run=<dir>``), or the configured model/task/twist with no run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from smclm.build import World, exact_pool, split_pool, world_for
from smclm.config import LATENT_EVALUATORS
from smclm.envinfo import write_env
from smclm.evaluators.exact import ExactSolution, check_enumerable, exact_metrics, solve
from smclm.tracking import write_json_atomic


def choose_evaluator(vocab_size: int, output_len: int, max_sequences: int) -> str:
    """``evaluator=auto``: exact when the Vᵀ sequences (per o) number at most max_sequences,
    else bounds."""
    return "exact" if output_len * math.log10(vocab_size) <= math.log10(max_sequences) else "bounds"


class Evaluator:
    """Evaluates the world's current proposal; caches the enumeration (it depends on p₀ only).

    Conditional tasks (infilling) are evaluated per o: the first ``evaluator.n_exact`` (s, o)
    pairs of the exact pool give the o's; exact metrics are enumerated for each o and averaged
    (log Z → E_o log Z(o)), and every bound run for σ^i uses its own o^i.

    ``evaluator.name=auto`` is resolved here (:func:`choose_evaluator`) and the choice written
    back to ``cfg.evaluator.name``, so that the run's saved config records it.

    ``evaluator=sentences``: :class:`smclm.evaluators.sentences.SentenceEvaluator` on the
    task's test prompts (``arithmetic``, ``overlap``, ``label_vote``: the evaluators of
    ``smclm.config.LATENT_EVALUATORS`` on task=latent's test rows, called the same way);
    ``untrained`` (``smclm eval`` without ``run=``): its ``sampler=auto`` samples p₀, not the
    configured (untrained) twist.
    """

    def __init__(
        self,
        cfg: DictConfig,
        world: World,
        pool: torch.Tensor | None,
        untrained: bool = False,
    ) -> None:
        self.cfg, self.world, self.pool = cfg, world, pool
        self.name = cfg.evaluator.name
        # an evaluator of the run's own samples on the task's test prompts (sentences, latent)
        self.on_samples = None
        if self.name == "sentences":
            from smclm.config import check_ranges
            from smclm.evaluators.sentences import SentenceEvaluator

            check_ranges(cfg)  # evaluator.n_samples, n_prompts (also for library callers)

            self.on_samples = SentenceEvaluator(
                cfg.evaluator,
                world.model,
                world.tokenizer,
                world.task,
                smc=cfg.smc,
                seed=int(cfg.seed),
                untrained=untrained,
            )
        if self.name in LATENT_EVALUATORS:  # the evaluators of task=latent's test rows
            from hydra.utils import get_object

            self.on_samples = get_object(LATENT_EVALUATORS[self.name])(
                cfg.evaluator, world.model, world.tokenizer, world.task, smc=cfg.smc,
                untrained=untrained,
            )  # fmt: skip
        if self.name == "auto":
            self.name = choose_evaluator(
                world.model.vocab_size,
                world.task.output_len,
                int(cfg.evaluator.get("max_sequences", 1_000_000)),
            )
            with open_dict(cfg):
                cfg.evaluator.name = self.name
        self._solutions: dict[int, ExactSolution] = {}
        self.exact_available = self._enumerable()
        if self.name == "exact" and not self.exact_available:
            check_enumerable(
                world.model.vocab_size, world.task.output_len, int(cfg.evaluator.max_sequences)
            )

    def _enumerable(self) -> bool:
        if self.name in ("none", "sentences", *LATENT_EVALUATORS):
            return False
        v, t = self.world.model.vocab_size, self.world.task.output_len
        limit = int(self.cfg.evaluator.get("max_sequences", 1_000_000))
        return t * math.log10(v) <= math.log10(limit) and self.cfg.evaluator.get("exact", True)

    @property
    def conditional(self) -> bool:
        return self.world.task.cond_len > 0

    def _conds(self) -> list[torch.Tensor | None]:
        """The o's to evaluate at ([1, c] each), or [None] for an unconditional task."""
        if not self.conditional:
            return [None]
        if self.pool is None:
            raise RuntimeError("a conditional task needs its (s, o) pool to be evaluated")
        _, o = split_pool(self.world.task, self.pool)
        n = min(int(self.cfg.evaluator.get("n_exact", 4)), o.shape[0])
        return [o[i : i + 1] for i in range(n)]

    def solution(self, i: int = 0, cond: torch.Tensor | None = None) -> ExactSolution:
        if i not in self._solutions:
            self._solutions[i] = solve(
                self.world.model,
                self.world.task,
                cond=cond,
                limit=int(self.cfg.evaluator.max_sequences),
            )
        return self._solutions[i]

    @torch.no_grad()
    def __call__(self, step: int) -> dict[str, float | str]:
        if self.name == "none":
            return {}
        if self.on_samples is not None:
            gen = torch.Generator(device=self.world.device).manual_seed(
                int(self.cfg.seed) * 1_000_003 + step
            )
            return self.on_samples(step, gen)
        out: dict[str, float | str] = {}
        log_z_exact = None
        model, task = self.world.model, self.world.task
        if self.exact_available:
            per_o = [
                exact_metrics(model, task, self.solution(i, c), cond=c)
                for i, c in enumerate(self._conds())
            ]
            for key in per_o[0]:
                out[key] = sum(m[key] for m in per_o) / len(per_o)
            log_z_exact = float(out["log_z/exact"])
        if self.name == "bounds":
            from smclm.evaluators.bounds import evaluate_bounds

            ev = self.cfg.evaluator
            gen = torch.Generator(device=self.world.device).manual_seed(
                int(self.cfg.seed) * 1_000_003 + step
            )
            if self.pool is None:
                raise RuntimeError("evaluator=bounds needs exact target samples")
            samples, cond = split_pool(task, self.pool)
            out.update(
                evaluate_bounds(
                    model,
                    task,
                    samples,
                    particles=list(ev.particles),
                    n_exact=int(ev.n_exact),
                    generator=gen,
                    resampling=self.cfg.smc.resampling,
                    proposals=tuple(ev.proposals),
                    log_z_exact=log_z_exact,
                    n_g_q=ev.get("n_g_q"),
                    max_batch_particles=int(ev.get("max_batch_particles", 2048)),
                    cond=cond,
                    progress=False,
                    # a policy without twists: SIS bounds only (SMC would target p₀'s marginals)
                    smc=model.policy is None or model.twist is not None,
                )
            )
        return out

    @property
    def needs_pool(self) -> bool:
        return self.name == "bounds" or (self.name == "exact" and self.conditional)


def evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict[str, float | str]:
    """`smclm eval`: evaluate a run's checkpoint, or the configured model/task/twist."""
    # The run fixes model, task and twist; this command's evaluator/smc/device settings win.
    world, eval_cfg, ckpt = world_for(cfg, ("evaluator", "smc", "device", "exact_samples"))
    if ckpt is not None:
        out_dir = Path(cfg.run) / "eval"
    # checks enumerability (or the sentence evaluator's settings) before any sampling
    evaluator = Evaluator(eval_cfg, world, None, untrained=ckpt is None)
    if evaluator.needs_pool:
        evaluator.pool = exact_pool(eval_cfg, world)
    metrics = evaluator(step=0)
    summary = {
        **metrics,
        "run/checkpoint": str(ckpt) if ckpt else None,
        "run/evaluator": evaluator.name,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "summary.json", summary)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(eval_cfg, resolve=True))
        write_env(out_dir, world.device)
    return summary
