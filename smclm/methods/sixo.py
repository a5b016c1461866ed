"""SIXO: density-ratio estimation by classification (paper §4.3, Eq. 24; reference ``sixo``).

ψ_t is trained as the logistic classifier that tells target prefixes s_1:t ~ σ(s_1:t) from base
prefixes p_1:t ~ p₀(s_1:t), with log ψ_t as its logit. Its optimum is ψ_t = σ(s_1:t)/p₀(s_1:t)
= ψ*_t / Z, the optimal twist up to a constant. With log σ(·) the logistic log-sigmoid:

    L = −[ Σ_k w̄_k (1/T) Σ_t log σ(log ψ_t(s_k,1:t)) + mean_{k,t} log σ(−log ψ_t(p_k,1:t)) ].

The second term is log(1 − sigmoid(x)) computed stably as logsigmoid(−x).

Samples (paper-spec §4.6):

* positives, ``positives="smc"`` (default): one twisted SMC run from q^π with K particles and
  resampling at every step t < T, no final resample; w̄ = softmax of the final (φ) log-weights.
  (CTL and DPG use SIS; SIXO uses SMC.)
* positives, ``positives="exact"``: K exact target samples with uniform weights.
* negatives: K fresh samples from the base model p₀.

Stopping tasks (README "Stopping"): the classifier at t tells σ's prefixes live at t (no stop
before t; the stop step ℓ included) from p₀'s, so each sample contributes its own steps t ≤ ℓ
(:func:`~smclm.methods.base.live_positions`; the sums are still divided by the cap T). The
negatives come from the sampler's masked p₀ proposal q (no stop before ``min_len``, a forced stop
at the cap), so each negative prefix carries its importance ratio p₀(s_1:t)/q(s_1:t) =
Π_{i ≤ t} p₀(allowed_i | s_<i) ≤ 1 (:func:`~smclm.methods.base.log_p0_allowed`; 1 for
m ≤ t < T): the negative term is then an expectation under p₀ itself, and the optimum stays
ψ_t = σ(s_1:t)/p₀(s_1:t) = ψ*_t / Z.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smclm.methods.base import (
    TrainContext,
    check_positives,
    live_positions,
    log_p0_allowed,
    require_twist,
)

POSITIVES = ("smc", "exact")


class SIXO:
    """Density-ratio classification. Options: ``positives`` = ``smc`` (default) | ``exact``."""

    name = "sixo"

    def __init__(self, positives: str = "smc") -> None:
        self.positives = check_positives("sixo", positives, POSITIVES)
        self.needs_exact = positives == "exact"

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task = batch.model, batch.task
        require_twist("sixo", model)
        prompt = task.prompt_ids
        with torch.no_grad():
            pos_tokens, w_pos, metrics = batch.weighted_positives(
                self.needs_exact, ess_threshold=1.0
            )
            neg_tokens = batch.sample(ess_threshold=0.0, p0=True, potential=False).tokens

        _, log_psi_pos_all = model.forward_full(prompt, pos_tokens, batch.cond)
        log_psi_pos = log_psi_pos_all.gather(-1, pos_tokens.unsqueeze(-1)).squeeze(-1)  # [K, T]
        log_p0_neg_all, log_psi_neg_all = model.forward_full(prompt, neg_tokens, batch.cond)
        log_psi_neg = log_psi_neg_all.gather(-1, neg_tokens.unsqueeze(-1)).squeeze(-1)  # [K, T]

        live_pos = live_positions(task, pos_tokens)
        if live_pos is None:
            # A zero-weight particle contributes 0 even where log ψ = −∞ (no 0·∞ = NaN).
            pos_per_seq = F.logsigmoid(log_psi_pos).mean(1).masked_fill(w_pos == 0, 0.0)
            pos = (w_pos * pos_per_seq).sum()
            neg = F.logsigmoid(-log_psi_neg).mean()
        else:
            t_len = pos_tokens.shape[1]
            pos_steps = F.logsigmoid(log_psi_pos).masked_fill(~live_pos, 0.0)
            pos_per_seq = (pos_steps.sum(1) / t_len).masked_fill(w_pos == 0, 0.0)
            pos = (w_pos * pos_per_seq).sum()
            live_neg = live_positions(task, neg_tokens)
            assert live_neg is not None
            with torch.no_grad():  # p₀(s_1:t)/q(s_1:t) of each live negative prefix
                log_ratio = log_p0_allowed(task, log_p0_neg_all)
                assert log_ratio is not None
                ratio = log_ratio.masked_fill(~live_neg, 0.0).cumsum(1).exp() * live_neg
            neg_steps = F.logsigmoid(-log_psi_neg).masked_fill(~live_neg, 0.0)
            neg = (ratio * neg_steps).sum() / neg_steps.numel()
        loss = -(pos + neg)
        metrics.update(
            {
                "train/loss": float(loss.detach()),
                "train/pos_term": float(pos.detach()),
                "train/neg_term": float(neg.detach()),
                "train/log_psi_mean": float(log_psi_pos.detach().mean()),
                "train/log_psi_neg_mean": float(log_psi_neg.detach().mean()),
            }
        )
        return loss, metrics
