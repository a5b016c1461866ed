"""SFT: supervised fine-tuning of the proposal policy on the task's demonstrations (the
"Supervised fine-tuning" baseline of Hu et al., ICLR 2024, Tables 3-4;
``../shared/docs/gfn-paper-spec.md`` §3.3, §4.4).

The demonstrations are the task's own (``task=latent``: the labelled training rows' z,
:meth:`smclm.tasks.latent.LatentPotential.seed_sequences`), each a finished sequence under its
prompt. Each update draws ``batch_size`` (default ``smc.n_particles``) of them uniformly with the
run's generator and minimises the mean negative log-likelihood per token under the policy,

    L = − Σ_i log q(z_i | x_i) / Σ_i ℓ_i,

with q the sampler's masked proposal (the stop counted, as the sampler draws it), one
teacher-forced pass per distinct prompt in the batch. No reward is used: the paper's settings
for this baseline are not in its code (spec §4.4, UNVERIFIED), so they are the user's to set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.methods.base import (
    TrainContext,
    live_positions,
    proposal_log_softmax,
    task_demonstrations,
)


class SFT:
    """Supervised fine-tuning of ``method.policy`` on the task's demonstrations."""

    name = "sft"
    needs_policy, needs_twist = True, False
    needs_exact = False  # it learns from the task's demonstrations

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(f"method.batch_size={batch_size!r}: a positive integer, or null")
        self.batch_size = batch_size
        self._demos: list[tuple[Tensor, Tensor]] | None = None

    def demos(self, task: Any) -> list[tuple[Tensor, Tensor]]:
        """(prompt ids, one padded finished sequence [T]) per demonstration (read once)."""
        if self._demos is None:
            groups = task_demonstrations(task, "method=sft")
            self._demos = [(p, row) for p, rows in groups for row in rows]
        return self._demos

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task = batch.model, batch.task
        if model.policy is None:
            raise ConfigError("method=sft trains a policy; set method.policy=mlp_head|full|lora")
        demos = self.demos(task)
        n = self.batch_size or batch.n_particles
        gen = batch.generator
        picks = torch.randint(len(demos), (n,), generator=gen, device=gen.device).tolist()
        by_prompt: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}
        for i in picks:
            prompt, row = demos[i]
            key = tuple(int(t) for t in prompt.tolist())
            by_prompt.setdefault(key, (prompt, []))[1].append(row)
        total = torch.zeros((), device=model.device)
        n_tokens = 0
        for prompt, rows in by_prompt.values():
            tokens = torch.stack(rows).to(model.device)
            _, log_q_all = model.policy_full(prompt.to(model.device), tokens)
            # the sampler's masked proposal, over each row's steps up to its stop
            log_q = proposal_log_softmax(task, log_q_all).gather(-1, tokens[..., None])
            live = live_positions(task, tokens)
            assert live is not None  # demonstrations exist only on stopping tasks
            total = total + torch.where(live, log_q.squeeze(-1), 0.0).sum()
            n_tokens += int(live.sum())
        loss = -total / max(1, n_tokens)
        metrics = {
            "train/loss": float(loss.detach()),
            "sft/nll_per_token": float(loss.detach()),
            "sft/prompts": float(len(by_prompt)),
        }
        return loss, metrics
