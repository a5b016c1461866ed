"""Low-rank adapters (LoRA, Hu et al. 2021) for ``nn.Linear`` and GPT-2's ``Conv1D``, in-house.

``add_lora(model, targets, r, alpha, dropout)`` replaces every module whose *last name component*
is in ``targets`` (e.g. ``c_attn``, ``q_proj``) by a wrapper computing

    y = base(x) + (alpha / r) · dropout(x) Aᵀ Bᵀ,   A [r, d_in] ~ Kaiming-uniform, B [d_out, r] = 0,

so the adapted model equals the original at initialisation. Only A and B are trainable. GPT-2's
``Conv1D`` stores its weight as [d_in, d_out] (the transpose of ``nn.Linear``); the wrapper reads
the fan-in/fan-out accordingly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return None


class LoRA(nn.Module):
    """A frozen Linear/Conv1D plus a trainable low-rank update (zero at initialisation)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        dims = _in_out(base)
        if dims is None:
            raise ValueError(f"LoRA wraps Linear or Conv1D layers, not {type(base).__name__}")
        d_in, d_out = dims
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(r, d_in, device=w.device, dtype=torch.float32))
        self.lora_b = nn.Parameter(torch.zeros(d_out, r, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        delta = (self.dropout(x).float() @ self.lora_a.t()) @ self.lora_b.t()
        return y + (self.scale * delta).to(y.dtype)


def add_lora(
    model: nn.Module, targets: list[str], r: int = 64, alpha: float = 16.0, dropout: float = 0.0
) -> list[str]:
    """Wrap the target layers of ``model`` in place; return the wrapped module names.

    Raises ValueError naming the available layer names when no target matches.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r={r} must be a positive integer")
    wanted = set(targets)
    hits: list[tuple[nn.Module, str, str]] = []
    candidates: set[str] = set()
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if _in_out(child) is None:
                continue
            candidates.add(child_name)
            if child_name in wanted:
                full = f"{name}.{child_name}" if name else child_name
                hits.append((module, child_name, full))
    if not hits:
        raise ValueError(
            f"LoRA targets {sorted(wanted)} match no Linear/Conv1D layer of this model; "
            f"its layer names are: {', '.join(sorted(candidates))}"
        )
    for parent, child_name, _ in hits:
        setattr(parent, child_name, LoRA(getattr(parent, child_name), r, alpha, dropout))
    return [full for _, _, full in hits]
