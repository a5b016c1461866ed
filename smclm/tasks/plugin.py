"""The task-builder contract, and a task from any potential over token ids.

A task config names its builder by ``_target_`` (built-in ones included, e.g.
``smclm.tasks.toy.toy_task``). smclm calls it as

    builder(env, name=…, prompt=…, output_len=…, cond_len=…, **the config's other keys) -> Task

where ``env`` is a :class:`TaskEnv` (the runtime objects a config cannot hold) and ``prompt`` is the
prompt text, already encoded in ``env.prompt_ids``. Nested ``_target_`` values (a potential, a
scorer) are instantiated by Hydra before the builder is called; a plain function is passed by
adding ``_partial_: true`` next to its ``_target_``. The builder returns a
:class:`smclm.tasks.base.Task` whose potential follows the contract in that module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from smclm.models.twisted_lm import vocab_size
from smclm.tasks.base import Task


class TaskEnv:
    """What a task builder receives besides its config keys.

    tokenizer: the LM's tokenizer (``batch_decode`` turns token ids back into text).
    base: the frozen base LM p₀ (a Hugging Face causal LM, on ``device``).
    device: where the sampler runs; potentials get tokens on this device.
    prompt_ids: the prompt's token ids [P] (``task.prompt`` without special tokens).

    A plain class, not a dataclass: Hydra would turn a dataclass argument into a config.
    """

    def __init__(self, tokenizer: Any, base: nn.Module, device: torch.device, prompt_ids: Tensor):
        self.tokenizer, self.base, self.device, self.prompt_ids = (
            tokenizer,
            base,
            device,
            prompt_ids,
        )

    @property
    def vocab_size(self) -> int:
        """V, the size of the LM's output distribution (token ids are in [0, V))."""
        return vocab_size(self.base)


def potential_task(
    env: TaskEnv,
    *,
    name: str,
    prompt: str,
    output_len: int,
    potential: Callable[..., Tensor],
    cond_len: int = 0,
    log_phi_max: float | None = None,
    beta: float = 1.0,
) -> Task:
    """A task whose potential is any callable ``potential(tokens [N, T], cond [N, c] | None) ->
    log φ [N]`` over the LM's output token ids (prompt excluded), named by ``task.potential``'s
    ``_target_``. ``log_phi_max`` (an upper bound on log φ, for exact samples by rejection) is
    taken from the potential's ``log_max()`` or ``log_max`` when the config leaves it null."""
    if not callable(potential):
        raise ValueError(
            f"task.potential is a {type(potential).__name__}, not a callable; give it a "
            "_target_ (add _partial_: true for a plain function)"
        )
    if log_phi_max is None:
        bound = getattr(potential, "log_max", None)
        log_phi_max = bound() if callable(bound) else bound
    return Task(
        name,
        env.prompt_ids,
        int(output_len),
        potential,
        log_phi_max=None if log_phi_max is None else float(log_phi_max),
        cond_len=int(cond_len),
        beta=float(beta),
    )
