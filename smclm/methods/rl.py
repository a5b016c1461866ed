"""RL: soft-Q least squares in log space (paper §4.2, Eq. 23; reference ``rl_q_lsq``).

The optimal twists satisfy the soft Bellman recursion ψ*_t(s_1:t) = Σ_v p₀(v | s_1:t) ψ*_{t+1}(s_1:t, v)
with ψ*_T = φ. Each log ψ_t is regressed onto the one-step target built from the same network:

    V_t = log ψ_t(s_1:t),
    Y_t = sg( logsumexp_v [ log p₀(v | s_1:t) + log ψ_{t+1}(s_1:t, v) ] )   for t < T,   Y_T = log φ(s_1:T),
    L   = mean_k (1/T) Σ_t (V_t − Y_t)².

Samples (paper-spec §4.6):

* ``positives="sis"`` (``rl_q_lsq``, default): the K particles of one SIS run (no resampling)
  from the twisted proposal q^π, with uniform weights (the weights are not used).
* ``positives="exact"`` (``rl_qsigma_lsq``): the same q samples plus K exact target samples,
  each set averaged on its own, so L = mean_q + mean_σ (a sum of two means, as in the reference).

Y_T = log φ must be finite: indicator potentials need a positive floor (task.epsilon > 0).
At the optimal twist the targets equal the values and the loss is exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smclm.errors import ConfigError
from smclm.methods.base import TrainContext, check_positives, require_twist
from smclm.models.twisted_lm import TwistedLM

POSITIVES = ("sis", "exact")


def _squared_error(
    model: TwistedLM, prompt: Tensor, tokens: Tensor, log_phi: Tensor, cond: Tensor | None
) -> tuple[Tensor, Tensor]:
    """mean over (k, t) of (V_t − Y_t)² on tokens [K, T] with log φ [K]; also V [K, T] (no grad)."""
    if not torch.isfinite(log_phi).all():
        raise ConfigError(
            "rl regresses log ψ_T onto log φ, which is -inf or NaN on some samples; use a "
            "potential with a positive floor (task.epsilon > 0)"
        )
    log_p0_all, log_psi_all = model.forward_full(prompt, tokens, cond)
    values = log_psi_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [K, T], with grad
    with torch.no_grad():
        # Step t+1's all-vocab quantities sit at index t (paper-spec §0), so the targets of
        # steps 1..T-1 come from indices 1..T-1.
        y_next = torch.logsumexp(log_p0_all[:, 1:] + log_psi_all[:, 1:], dim=-1)
        targets = torch.cat([y_next, log_phi.to(y_next)[:, None]], dim=1)
    return (values - targets).pow(2).mean(), values.detach()


class RL:
    """Soft-Q least squares. Options: ``positives`` = ``sis`` (default) | ``exact``."""

    name = "rl"

    def __init__(self, positives: str = "sis") -> None:
        self.positives = check_positives("rl", positives, POSITIVES)
        self.needs_exact = positives == "exact"

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task, k = batch.model, batch.task, batch.n_particles
        require_twist("rl", model)
        prompt = task.prompt_ids
        with torch.no_grad():
            sis = batch.sample(ess_threshold=0.0)
        loss_q, values = _squared_error(model, prompt, sis.tokens, sis.log_phi, batch.cond)
        loss = loss_q
        metrics = {"train/loss_q": float(loss_q.detach())}
        if self.needs_exact:
            with torch.no_grad():
                pos_tokens = batch.draw_exact(k)
                pos_log_phi = task.log_phi(pos_tokens, batch.cond)
            loss_sigma, _ = _squared_error(model, prompt, pos_tokens, pos_log_phi, batch.cond)
            loss = loss_q + loss_sigma
            metrics["train/loss_sigma"] = float(loss_sigma.detach())
        metrics.update(
            {
                "train/loss": float(loss.detach()),
                "train/log_psi_mean": float(values.mean()),
                "train/log_psi_T_mean": float(values[:, -1].mean()),
                "train/log_phi_mean": float(sis.log_phi.mean()),
                "train/log_z_hat": sis.log_z_hat,
            }
        )
        return loss, metrics
