"""DPG: mass-covering proposal learning, min KL(σ ‖ q^π) (paper §4.5, App. E.3; ``one_total_kl``).

The learned object is the twist-induced proposal q^π_t(v | s_<t) = softmax_v(log p₀ + log ψ_t)
itself. Its maximum-likelihood gradient under σ is −E_σ[∇ log q^π(s_1:T)], and

    ∇ log q^π_t(s_t | s_<t) = ∇ log ψ_t(s_1:t) − Σ_v q^π_t(v | s_<t) ∇ log ψ_t(s_<t, v),

with the expectation over the next token computed exactly over the vocabulary. The loss is

    L = −Σ_k w̄_k (1/T) Σ_t [ log ψ_t(s_k,1:t) − Σ_v sg(q_t(v | s_k,<t)) log ψ_t(s_k,<t, v) ].

Samples (paper-spec §4.6):

* ``positives="sis"`` (default): one SIS run (no resampling) from q^π with K particles and the
  φ weights w̄ = softmax(log p₀ + log φ − log q) (the run's final log-weights).
* ``positives="exact"``: K exact target samples with uniform weights (no SIS run).

Stopping tasks (README "Stopping"): q^π is the sampler's masked proposal (no stop before
``min_len``, only stops at the cap), log q^π(z) = Σ_{t ≤ ℓ} log q^π_t, and each sample's sum runs
over its own steps t ≤ ℓ (:func:`~smclm.methods.base.live_positions`), still divided by the cap T
(a per-length mean would weight short outputs up and move the optimum away from σ):

    L = −Σ_k w̄_k (1/T) Σ_{t ≤ ℓ_k} [ log ψ_t(s_k,1:t) − Σ_v sg(q_t(v | s_k,<t)) log ψ_t(s_k,<t, v) ].
"""

from __future__ import annotations

import torch
from torch import Tensor

from smclm.methods.base import (
    TrainContext,
    check_positives,
    live_positions,
    proposal_log_softmax,
    require_twist,
)

POSITIVES = ("sis", "exact")


class DPG:
    """KL(σ‖q^π) minimisation. Options: ``positives`` = ``sis`` (default) | ``exact``."""

    name = "dpg"

    def __init__(self, positives: str = "sis") -> None:
        self.positives = check_positives("dpg", positives, POSITIVES)
        self.needs_exact = positives == "exact"

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task = batch.model, batch.task
        require_twist("dpg", model)
        prompt = task.prompt_ids
        with torch.no_grad():
            tokens, w, metrics = batch.weighted_positives(self.needs_exact, ess_threshold=0.0)

        log_p0_all, log_psi_all = model.forward_full(prompt, tokens, batch.cond)
        log_psi = log_psi_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [K, T]
        live = live_positions(task, tokens)  # None: fixed length
        with torch.no_grad():
            if live is None:
                q_all = torch.softmax(log_p0_all + log_psi_all, dim=-1)  # [K, T, V]
                log_q = q_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log().sum(1)  # [K]
            else:  # the masked proposal, summed up to each sample's stop
                q_all = proposal_log_softmax(task, log_p0_all + log_psi_all).exp()
                q_all = q_all.masked_fill(~live[..., None], 0.0)  # no step after the stop
                log_q_t = q_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).log()
                log_q = log_q_t.masked_fill(~live, 0.0).sum(1)
        # Σ_v q_t(v) log ψ_t(·, v); tokens q gives no mass to contribute 0 even if log ψ = −∞.
        expected = (q_all * log_psi_all.masked_fill(q_all == 0, 0.0)).sum(-1)  # [K, T]
        if live is None:
            per_seq = (log_psi - expected).mean(1)  # (1/T) Σ_t ∇-surrogate of log q^π_t(s_t)
        else:  # the steps after the stop carry nothing
            per_seq = (log_psi - expected).masked_fill(~live, 0.0).sum(1) / tokens.shape[1]
        loss = -(w * per_seq.masked_fill(w == 0, 0.0)).sum()
        metrics.update(
            {
                "train/loss": float(loss.detach()),
                "train/log_psi_mean": float(log_psi.detach().mean()),
                # −Σ_k w̄_k log q^π(s_k): an estimate of the cross-entropy H(σ, q^π) being minimised
                "train/cross_entropy": float(-(w * log_q).sum()),
            }
        )
        return loss, metrics
