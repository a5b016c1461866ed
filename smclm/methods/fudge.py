"""FUDGE: binary cross-entropy with soft labels (paper §4.4, Eq. 25; reference ``bce_p``).

FUDGE (Yang & Klein, 2021) trains ψ_t(s_1:t) ∈ (0, 1) as a classifier of "the finished sequence
satisfies φ" from prefixes under the base model, so that at optimum
ψ_t(s_1:t) = E_p₀(s_t+1:T | s_1:t)[φ(s_1:T)] = ψ*_t (for φ ∈ [0, 1]). With y_k = φ(s_k) the label
of every prefix of the p₀ sample s_k (a one-rollout estimate: the sample's own suffix is its
rollout),

    L = mean_{k,t} BCE(log ψ_t(s_k,1:t), y_k),   BCE(x, y) = −y·x − (1 − y)·log(1 − eˣ).

Samples (paper-spec §4.6): K fresh samples from the base model p₀; no exact samples.

Requirements and numerics:

* The twist must output log ψ ≤ 0, i.e. be built with ``twist.squash=logsigmoid`` (the trainer
  sets it from ``method.twist_squash``). A twist that does not is rejected with a ConfigError (a ValueError).
* Labels are y = exp(log φ) clamped to [0, 1]. For unbounded potentials (e.g. ``exp_count`` with
  β > 0, where φ ≥ 1) the clamp makes the labels saturate at 1 and FUDGE is not meaningful; use a
  potential with φ ∈ [0, 1] (indicators, class probabilities).
* log(1 − eˣ) is computed stably (log(−expm1 x) near 0, log1p(−eˣ) below −log 2) with x capped at
  −1e-6 in value only (the gradient passes through unchanged), so ψ → 1 costs a large but finite
  loss instead of −∞.

Stopping tasks (README "Stopping"): the optimum is ψ*_t(z_1:t) = E_p₀[φ(z)·1(m ≤ ℓ ≤ T) | z_1:t] on
the prefixes live at t (the stop step ℓ included, where ψ* = φ). The p₀ samples come from the
sampler's masked proposal q (no stop before ``min_len``, a forced stop at the cap), so the label
of step t is importance-corrected by its suffix: y_k,t = φ(z_k) · p₀(z_k,t+1:ℓ | z_k,1:t) /
q(z_k,t+1:ℓ | z_k,1:t) = φ(z_k) · Π_{t < i ≤ ℓ} p₀(allowed_i | z_k,<i) ∈ [0, φ]
(:func:`~smclm.methods.base.log_p0_allowed`), whose expectation given the prefix is ψ*_t. The
mean runs over the live steps t ≤ ℓ_k only (:func:`~smclm.methods.base.live_positions`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.methods.base import TrainContext, live_positions, log_p0_allowed, require_twist

POSITIVES = ("p0", "sis")
_X_MAX = -1e-6


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends; values above −1e-6 are read as −1e-6."""
    x = torch.where(x > _X_MAX, x - (x - _X_MAX).detach(), x)  # cap the value, keep the gradient
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class FUDGE:
    """BCE on p₀ samples with soft labels φ. Options: ``positives`` = ``p0`` (default) | ``sis``,
    two names for the same thing (the method config group's shared key; FUDGE always uses p₀)."""

    name = "fudge"

    def __init__(self, positives: str = "p0") -> None:
        if positives not in POSITIVES:
            raise ConfigError(
                f"method.positives={positives!r} is not valid for fudge, which trains on p₀ "
                f"samples only (bce_p); choose one of: {', '.join(POSITIVES)}"
            )
        self.positives = positives
        self.needs_exact = False

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task = batch.model, batch.task
        require_twist("fudge", model)
        squash = getattr(getattr(model.twist, "head", None), "squash", "logsigmoid")
        if squash != "logsigmoid":
            raise ConfigError(
                "fudge needs a twist with log ψ ≤ 0, but this twist's head has squash="
                f"{squash!r}; set twist.squash=logsigmoid (method.twist_squash does this)"
            )
        prompt = task.prompt_ids
        with torch.no_grad():
            sample = batch.sample(ess_threshold=0.0, p0=True, potential=False)
            tokens = sample.tokens
            log_phi = task.log_phi(tokens, batch.cond)
            labels = log_phi.exp().clamp(0.0, 1.0)[:, None]  # [K, 1], the same for every t

        log_p0_all, log_psi_all = model.forward_full(prompt, tokens, batch.cond)
        log_psi = log_psi_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [K, T]
        live = live_positions(task, tokens, sample.lengths)  # None: fixed length
        if live is not None:
            log_psi = log_psi.masked_fill(~live, -1.0)  # any value: these steps carry nothing
        if (log_psi.detach() > 0).any():
            raise ConfigError(
                "fudge needs log ψ ≤ 0 (ψ is a probability), but the twist returned log ψ > 0; "
                "set twist.squash=logsigmoid"
            )
        if live is not None:
            with torch.no_grad():  # y_k,t = φ(z_k) · p₀/q of the suffix after t
                log_ratio = log_p0_allowed(task, log_p0_all)
                assert log_ratio is not None
                log_ratio = log_ratio.masked_fill(~live, 0.0)
                suffix = log_ratio.sum(1, keepdim=True) - log_ratio.cumsum(1)
                labels = (labels * suffix.exp()).clamp(0.0, 1.0)  # [K, T]
        pos = labels * log_psi.masked_fill(labels == 0, 0.0)  # 0·(−∞) counts as 0
        neg = (1 - labels) * log1mexp(log_psi).masked_fill(labels == 1, 0.0)
        if live is None:
            loss = -(pos + neg).mean()
        else:  # the mean over the live steps
            loss = -(pos + neg).masked_fill(~live, 0.0).sum() / live.sum()
        shown_psi, shown_labels = log_psi.detach(), labels
        if live is not None:  # the live steps only
            shown_psi, shown_labels = shown_psi[live], labels[live]
        metrics = {
            "train/loss": float(loss.detach()),
            "train/label_mean": float(shown_labels.mean()),
            "train/log_psi_mean": float(shown_psi.mean()),
            "train/psi_mean": float(shown_psi.exp().mean()),
        }
        return loss, metrics
