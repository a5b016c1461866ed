"""CTL: contrastive twist learning (paper §4.1, Eq. 22; reference ``ebm_one_sample``).

Each ψ_t is an energy-based model of the intermediate target σ(s_1:t). Its log-likelihood gradient is

    ∇L_t = E_σ(s_1:t)[∇ log ψ_t(s_1:t)] − E_π_t(s_1:t)[∇ log ψ_t(s_1:t)],   π_t ∝ p₀(s_1:t) ψ_t(s_1:t),

and the loss below is minus its estimate, averaged over t:

    L = −(1/T) Σ_t [ Σ_k w̄⁺_k log ψ_t(s⁺_k,1:t) − Σ_k w̄⁻_k,t log ψ_t(s_k,1:t) ].

Samples (paper-spec §4.6):

* ``positives="sis"`` (``ebm_one_sample``, the paper's CTL): one SIS run (no resampling) from the
  twisted proposal q^π with K particles. Positives are those particles with the φ weights
  w̄⁺ = softmax(log p₀ + log φ − log q) at T (the SIS run's final log-weights). Negatives are
  the **same** particles with weights w̄⁻_t = softmax_k(log p₀(s_1:t) + log ψ_t(s_1:t) − log q(s_1:t))
  for every t, using the learned ψ_T at t = T.
* ``positives="exact"`` (``ebm_reweight``, the exact-σ ablation): K exact target samples with
  uniform weights as positives; negatives from the SIS run as above.
* ``positives="csmc"`` (the paper's infilling CTL, ``use_smc_ub_for_pos_samples``, App. G.4):
  positives are the particles of a conditional SMC run (resampling at every t < T) with one
  exact sample pinned — per o on conditional tasks, the pair's s — weighted by the softmax of
  the final-step (φ) log-weights; negatives from the SIS run as above.

All weights are stop-grad; the gradient flows only through log ψ of one teacher-forced pass per
sample set.

Stopping tasks (README "Stopping"): ψ_t is an energy model of σ's prefixes that are still live at
t (no stop before t; the stop step ℓ itself included, where the twist's value of the stopped
sequence models φ). Each sample contributes the steps t ≤ ℓ of its own length
(:func:`~smclm.methods.base.live_positions`); the negative weights w̄⁻_t are normalised over the
particles live at t, with log q the sampler's masked proposal; and, as the positives' live mass
at t is P_σ(ℓ ≥ t) < 1, the negative term at t is scaled by that mass (Σ_k w̄⁺_k 1[ℓ_k ≥ t]), so
that the loss is the log-likelihood of the positives' own prefixes:

    L = −(1/T) Σ_t [ Σ_k w̄⁺_k 1[ℓ_k ≥ t] log ψ_t(s⁺_k,1:t) − (Σ_k w̄⁺_k 1[ℓ_k ≥ t]) Σ_k w̄⁻_k,t log ψ_t(s_k,1:t) ],

whose expected gradient vanishes at ψ* (π_t ∝ p₀ψ*_t is σ restricted to the prefixes live at t).
A fixed-length task has every 1[ℓ_k ≥ t] = 1: the loss above, computed as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.methods.base import (
    TrainContext,
    check_positives,
    live_positions,
    masked_normalize,
    proposal_log_softmax,
    require_twist,
)
from smclm.smc.sampler import ess

POSITIVES = ("sis", "exact", "csmc")


def _weighted_sum(w: Tensor, x: Tensor) -> Tensor:
    """Σ_k w_k x_k over dim 0, where a zero weight contributes 0 even if x_k = −∞."""
    return (w * x.masked_fill(w == 0, 0.0)).sum(0)


class CTL:
    """Contrastive twist learning. ``positives`` = ``sis`` (default) | ``exact`` | ``csmc``."""

    name = "ctl"

    def __init__(self, positives: str = "sis") -> None:
        self.positives = check_positives("ctl", positives, POSITIVES)
        self.needs_exact = positives in ("exact", "csmc")

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task, k = batch.model, batch.task, batch.n_particles
        require_twist("ctl", model)
        prompt = task.prompt_ids
        with torch.no_grad():
            sis = batch.sample(ess_threshold=0.0)
            pos_tokens, w_pos = None, None
            if self.positives == "exact":
                pos_tokens = batch.draw_exact(k)
            elif self.positives == "csmc":
                g = batch.n_groups
                if k // g < 2:
                    raise ConfigError(
                        "method.positives=csmc needs at least 2 particles per o; raise "
                        "method.particles_per_cond (the paper: 4)"
                    )
                # one exact sample per SMC run: the pair's s of each o group, or one pool draw
                pins = batch.draw_exact(k)[:: k // g] if batch.cond is not None else None
                pins = batch.draw_exact(1) if pins is None else pins
                csmc = batch.sample(ess_threshold=1.0, pinned=pins)
                pos_tokens, w_pos = csmc.tokens, batch.normalize(csmc.log_w)
                pos_ess = ess(csmc.log_w) / k

        # Negatives (and SIS positives): one teacher-forced pass on the SIS particles.
        log_p0_all, log_psi_all = model.forward_full(prompt, sis.tokens, batch.cond)
        idx = sis.tokens.unsqueeze(-1)
        log_psi = log_psi_all.gather(-1, idx).squeeze(-1)  # [K, T], with grad
        live = live_positions(task, sis.tokens, sis.lengths)  # None: fixed length
        with torch.no_grad():
            log_p0 = log_p0_all.gather(-1, idx).squeeze(-1)
            log_q_all = proposal_log_softmax(task, log_p0_all + log_psi_all)
            log_q = log_q_all.gather(-1, idx).squeeze(-1)
            if live is None:
                log_w_neg = log_p0.cumsum(1) + log_psi - log_q.cumsum(1)  # [K, T]: π_t / q
                w_neg = batch.normalize(log_w_neg)
            else:  # π_t / q over the particles live at t (each sum stops at its ℓ)
                log_p0, log_q = log_p0.masked_fill(~live, 0.0), log_q.masked_fill(~live, 0.0)
                log_w_neg = log_p0.cumsum(1) + log_psi - log_q.cumsum(1)
                log_w_neg = log_w_neg.masked_fill(~live, -torch.inf)
                w_neg = masked_normalize(batch, log_w_neg, live)
        neg = _weighted_sum(w_neg, log_psi)  # [T]

        if pos_tokens is None:
            w_pos = batch.normalize(sis.log_w)  # log p₀ + log φ − log q at T
            pos_ess = ess(sis.log_w) / k
            pos, live_pos, log_psi_pos = None, live, log_psi
        else:
            _, log_psi_pos_all = model.forward_full(prompt, pos_tokens, batch.cond)
            log_psi_pos = log_psi_pos_all.gather(-1, pos_tokens.unsqueeze(-1)).squeeze(-1)
            live_pos = live_positions(task, pos_tokens)
            pos = None
            if w_pos is None:  # exact positives, uniform weights
                pos_ess = 1.0
                if live_pos is None:
                    pos = log_psi_pos.mean(0)
                else:
                    w_pos = torch.full((k,), 1.0 / k, device=log_psi_pos.device)
        if pos is None and live_pos is None:
            pos = _weighted_sum(w_pos[:, None], log_psi_pos)
        elif pos is None:
            w_live = w_pos[:, None] * live_pos  # [K, T]: each positive's own steps
            pos = _weighted_sum(w_live, log_psi_pos)
            neg = neg * w_live.sum(0)  # the positives' live mass P_σ(ℓ ≥ t)
        loss = -(pos - neg).mean()

        metrics = {
            "train/loss": float(loss.detach()),
            "train/ess_frac": float(pos_ess),
            "train/neg_ess_frac": sum(ess(log_w_neg[:, t]) for t in range(log_w_neg.shape[1]))
            / (log_w_neg.shape[1] * k),
            "train/pos_term": float(pos.detach().mean()),
            "train/neg_term": float(neg.detach().mean()),
            "train/log_psi_mean": float(log_psi.detach().mean()),
            "train/log_z_hat": sis.log_z_hat,
        }
        return loss, metrics
