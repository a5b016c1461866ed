"""Proposal policies q_θ learned directly (PPO, GFlowNet), behind the twist interface.

A policy has ``begin``/``advance``/``reorder``/``full`` like a twist (see
:mod:`smclm.models.twist`) and returns *policy logits* l [N, V]; :class:`TwistedLM` turns them
into log q = log_softmax(log p₀ + l) when ``residual`` is true, else log_softmax(l). Every policy
also has ``full_with_features(...) -> (logits [N, T, V], features [N, T, d])``, the hidden
features a value head (PPO) or flow head reads, and ``feature_dim``. Kinds (baselines-spec A7.2):

* ``mlp_head``              log q = log_softmax(log p₀ + MLP(h_t)), frozen body: one base pass gives
                            p₀ and q. Zero-initialised output, so q = p₀ at the start.
* ``separate_conditional``  log q = log_softmax(log p₀ + MLP([h^θ_t ; g^θ(o)])) with a trainable
                            copy of the body (its own KV cache) and g^θ(o) computed once per o.
* ``full``                  a trainable copy of the whole LM: log q = log_softmax(lm_θ(s_<t)).
* ``lora``                  ``full`` with the copy frozen and LoRA adapters on the target layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from smclm.models.cache import cache_kwargs, reorder_cache
from smclm.models.lora import add_lora
from smclm.models.twist import Head, HeadTwist, SeparateTwist, TwistState
from smclm.models.twisted_lm import hidden_dim, output_logits, vocab_size

POLICIES = ("full", "mlp_head", "separate_conditional", "lora")

# Hu et al.'s targets: GPT-2 names its attention/MLP projections c_attn/c_proj/c_fc (Conv1D);
# GPT-Neo (TinyStories) q_proj/k_proj/v_proj/out_proj and c_fc/c_proj (Linear).
DEFAULT_LORA_TARGETS = ["c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "out_proj"]


class _ResidualHead:
    """What ``mlp_head`` and ``separate_conditional`` add to their twist classes: residual logits
    and the head's input as the features (a value head or flow head reads them)."""

    residual = True
    head: Head  # provided by the twist class it is mixed into, with ``features``
    features: Callable[[Tensor, Tensor, int, Tensor | None], Tensor]

    @property
    def feature_dim(self) -> int:
        return int(self.head.net[0].in_features)

    def full_with_features(
        self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        x = self.features(input_ids, base_hidden, start, cond)
        return self.head(x), x


class HeadPolicy(_ResidualHead, HeadTwist):
    """``mlp_head`` (and its conditional form): a residual MLP on the frozen base's hidden state."""


class SeparatePolicy(_ResidualHead, SeparateTwist):
    """``separate_conditional``: a trainable body copy plus a residual MLP on [h^θ ; g^θ(o)]."""


class FullPolicy(nn.Module):
    """``full`` / ``lora``: a copy of the whole causal LM (its own KV cache), logits not residual."""

    residual = False

    def __init__(self, base: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lm = copy.deepcopy(base).to(dtype)
        for p in self.lm.parameters():
            p.requires_grad_(True)
        self.lora_layers: list[str] = []

    def enable_lora(self, targets: list[str], r: int, alpha: float, dropout: float) -> None:
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lora_layers = add_lora(self.lm, targets, r, alpha, dropout)

    @property
    def feature_dim(self) -> int:
        return hidden_dim(self.lm)

    def _check(self, cond: Tensor | None) -> None:
        if cond is not None:
            raise ValueError(
                "policy full/lora does not take conditioning tokens; use "
                "policy=separate_conditional for conditional tasks"
            )

    def _logits(self, h: Tensor) -> Tensor:
        return output_logits(self.lm, h)

    def begin(self, prompt_ids: Tensor, base_hidden: Tensor, n: int, cond: Tensor | None):
        from smclm.models.cache import make_kv_cache

        self._check(cond)
        cache = make_kv_cache()
        body = self.lm.base_model
        out = body(input_ids=prompt_ids, **cache_kwargs(body, cache))
        reorder_cache(cache, torch.zeros(n, dtype=torch.long, device=prompt_ids.device))
        return TwistState(cache=cache), self._logits(out.last_hidden_state[:, -1]).expand(n, -1)

    def advance(self, state: TwistState, tokens: Tensor, base_hidden: Tensor) -> Tensor:
        body = self.lm.base_model
        out = body(input_ids=tokens[:, None], **cache_kwargs(body, state.cache))
        return self._logits(out.last_hidden_state[:, -1])

    def reorder(self, state: TwistState, ancestors: Tensor) -> None:
        reorder_cache(state.cache, ancestors)

    def full_with_features(
        self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        self._check(cond)
        h = self.lm.base_model(input_ids=input_ids).last_hidden_state[:, start:]
        return self._logits(h), h

    def full(self, input_ids: Tensor, base_hidden: Tensor, start: int, cond: Tensor | None):
        return self.full_with_features(input_ids, base_hidden, start, cond)[0]


def build_policy(
    kind: str,
    base: nn.Module,
    *,
    conditional: bool = False,
    hidden_mult: int = 1,
    n_layers: int = 3,
    lora_r: int = 64,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: list[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The policy ``kind`` (one of POLICIES) on top of the frozen base LM; starts at q = p₀."""
    if kind not in POLICIES:
        raise ValueError(f"unknown policy '{kind}'; choose one of: {', '.join(POLICIES)}")
    device = next(base.parameters()).device
    d = hidden_dim(base)
    vocab = vocab_size(base)
    if kind in ("full", "lora"):
        if conditional:
            raise ValueError(
                f"policy={kind} cannot condition on o; use policy=separate_conditional "
                "for conditional tasks (infilling)"
            )
        pol = FullPolicy(base, dtype=dtype).to(device)
        if kind == "lora":
            pol.enable_lora(lora_targets or DEFAULT_LORA_TARGETS, lora_r, lora_alpha, lora_dropout)
        return pol
    d_in = 2 * d if conditional else d
    head = Head(d_in, vocab, kind="mlp", hidden_mult=hidden_mult, n_layers=n_layers)
    if kind == "mlp_head":
        return HeadPolicy(
            head.to(device=device, dtype=dtype), base.base_model if conditional else None
        )
    return SeparatePolicy(base.base_model, head, dtype=dtype).to(device)
