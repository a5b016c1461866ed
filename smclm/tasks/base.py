"""A task: a prompt, an output length T and a potential log φ over full output sequences.

Potentials are plain callables ``log_phi(tokens [N, T], cond [N, c] | None) -> [N]`` (float32).
``log_phi_max`` is a known upper bound on log φ (0 for indicators and class probabilities), used
by rejection sampling of exact target samples; None when no bound is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class Task:
    name: str
    prompt_ids: Tensor  # [P]
    output_len: int  # T
    potential: Callable[..., Tensor]
    log_phi_max: float | None = None
    cond_len: int = 0  # c > 0 for conditional tasks (infilling)

    def log_phi(self, tokens: Tensor, cond: Tensor | None = None) -> Tensor:
        """log φ(s_1:T [, o]) for tokens [N, T] → [N] float32."""
        return self.potential(tokens, cond).float()

    def bind(self, cond: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """log φ with the conditioning bound in, the form the sampler takes."""
        return lambda tokens: self.log_phi(tokens, cond)
