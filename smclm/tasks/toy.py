"""The toy task: potentials over token ids, for any causal LM (paper-spec §6 in miniature).

* ``threshold``: log φ = log(1[#{t : s_t ∈ target_ids} ≥ min_count] + ε), the indicator form of
  the paper's toxicity-threshold task, with its ε = 1e-16 floor.
* ``exp_count``: log φ = β · #{t : s_t ∈ target_ids}.

With ``stop`` (token ids or one-token strings, resolved against the tokenizer) outputs end at
a stop token, with ``min_len`` ≤ ℓ ≤ ``output_len`` (ℓ counts the stop; README "Stopping"); the
counts run over the finished sequence, its stop included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smclm.tasks.base import Task, resolve_stop_ids
from smclm.tasks.plugin import TaskEnv

POTENTIALS = ("threshold", "exp_count")


class CountPotential:
    """log φ from the number of output tokens that belong to ``target_ids``."""

    def __init__(
        self,
        kind: str,
        target_ids: list[int],
        min_count: int = 1,
        epsilon: float = 1e-16,
        beta: float = 1.0,
    ) -> None:
        if kind not in POTENTIALS:
            raise ValueError(
                f"unknown toy potential '{kind}'; choose one of: {', '.join(POTENTIALS)}"
            )
        self.kind, self.min_count, self.epsilon, self.beta = kind, min_count, epsilon, beta
        self.target_ids = torch.tensor(sorted(set(target_ids)), dtype=torch.long)

    def count(self, tokens: Tensor) -> Tensor:
        return torch.isin(tokens, self.target_ids.to(tokens.device)).sum(dim=1)

    def __call__(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self.count(tokens).float()
        if self.kind == "exp_count":
            return self.beta * c
        hit = (c >= self.min_count).float()
        return torch.log(hit + self.epsilon)

    def log_max(self, output_len: int) -> float:
        """An upper bound on log φ: 0 for the indicator, β·T (β > 0) or 0 (β ≤ 0) otherwise."""
        if self.kind == "threshold":
            return math.log1p(self.epsilon)
        return max(self.beta, 0.0) * output_len


def toy_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    potential: str,
    target_ids: list[int],
    min_count: int = 1,
    epsilon: float = 1e-16,
    beta: float = 1.0,
    cond_len: int = 0,
    stop: int | str | list | None = None,
    min_len: int = 1,
) -> Task:
    """The task of configs/task/toy.yaml (any causal LM: the potential reads token ids)."""
    if cond_len:
        raise ValueError(f"task.cond_len={cond_len}: the toy task is unconditional")
    stop_ids = resolve_stop_ids(env.tokenizer, stop, env.vocab_size)
    if not stop_ids and int(min_len) != 1:
        raise ValueError(
            f"task.min_len={min_len} needs stop tokens (task.stop); without them every output "
            f"has exactly task.output_len={output_len} tokens"
        )
    return build_toy_task(
        env.prompt_ids,
        int(output_len),
        potential,
        list(target_ids),
        env.vocab_size,
        min_count=int(min_count),
        epsilon=float(epsilon),
        beta=float(beta),
        name=name,
        stop_ids=stop_ids,
        min_len=int(min_len),
    )


def build_toy_task(
    prompt_ids: Tensor,
    output_len: int,
    potential: str,
    target_ids: list[int],
    vocab_size: int,
    min_count: int = 1,
    epsilon: float = 1e-16,
    beta: float = 1.0,
    name: str = "toy",
    stop_ids: tuple[int, ...] | list[int] = (),
    min_len: int = 1,
) -> Task:
    """stop_ids: the stop tokens (empty: fixed length output_len); min_len: the shortest
    finished output, its stop counted (stop_ids only)."""
    bad = [i for i in target_ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(
            f"task.target_ids {bad} are outside the model's vocabulary [0, {vocab_size}); "
            "pick ids below the vocabulary size"
        )
    pot = CountPotential(potential, [int(i) for i in target_ids], min_count, epsilon, beta)
    return Task(
        name,
        prompt_ids,
        output_len,
        pot,
        log_phi_max=pot.log_max(output_len),
        beta=beta if potential == "exp_count" else 1.0,  # β only where φ uses it
        stop_ids=tuple(int(i) for i in stop_ids),
        min_len=int(min_len),
    )
