"""RL: soft-Q least squares in log space (paper §4.2, Eq. 23; reference ``rl_q_lsq``).

The optimal twists satisfy the soft Bellman recursion ψ*_t(s_1:t) = Σ_v p₀(v | s_1:t) ψ*_{t+1}(s_1:t, v)
with ψ*_T = φ. The paper regresses each log ψ_t onto the one-step target Y_t:

    V_t = log ψ_t(s_1:t),
    Y_t = sg( logsumexp_v [ log p₀(v | s_1:t) + log ψ̄_{t+1}(s_1:t, v) ] )   for t < T,   Y_T = log φ(s_1:T),
    ℓ(s) = (1/T) Σ_t (V_t − G_t)²,

with G_t = Y_t (``td_lambda=0``, the paper). The default regresses onto the λ-return instead:

    G_T = Y_T,   G_t = Y_t + λ (G_{t+1} − V̄_{t+1}) = Y_t + Σ_{j>t} λ^{j−t} (Y_j − V̄_j),

where V̄_j = log ψ̄_j(s_1:j). On samples from the twisted proposal q^π, Y_{j−1} − V_j = log p₀(s_j | ·)
− log q(s_j | ·), so λ = 1 (the default) gives G_t = log φ(s) + Σ_{j>t} log (p₀/q)(s_j | s_<j): the
log importance weight of the sampled suffix, a Monte-Carlo target that carries log φ to every t in
one update. The one-step target carries it back one step per round of fitting and leans on the
head's values at tokens no sample has shown; on toy worlds with T = 4–6 and exp_count β ≥ 4 it did
not halve KL(σ‖q) in 100 updates while regression onto log ψ* on the same samples did (issue 20,
docs/results/rl_study.md). Every TD error Y_j − V_j is 0 at ψ = ψ̄ = ψ*, so G_t = Y_t = V_t there
for any λ: the fixed point is the same.

ψ̄ is the twist itself in the paper; with ``target_ema > 0`` it is a slowly updated copy (a target
network, Polyak-averaged after every update). At ψ = ψ̄ = ψ* every target equals its value and
the loss is exactly 0 on any samples: the fixed point does not depend on the sampling
distribution, which is what lets the σ-weighted term below change the weighting and not the answer.

Samples (paper-spec §4.6), drawn without gradients from one SIS run (no resampling) of K
particles from the twisted proposal q^π:

* ``positives="sis"`` (``rl_q_lsq``, the paper): L = mean_k ℓ(s^k), uniform weights.
* ``positives="snis"`` (the default): L = mean_k ℓ(s^k) + Σ_k w̄_k ℓ(s^k), with the self-normalised
  importance weights w̄ ∝ p₀φ/q of the same particles standing in for exact σ samples: the
  structure of ``rl_qsigma_lsq`` without a pool (as CTL and DPG use φ-weighted SIS positives).
  Uniform weights alone fit ψ where q already goes; where q under-proposes what σ holds, the
  errors are seldom sampled and persist (the relapse of issue 14); the σ-weighted term samples them.
* ``positives="exact"`` (``rl_qsigma_lsq``): L = mean_k ℓ(s^k) + mean_i ℓ(σ^i) over K exact target
  samples (a sum of two means, as in the reference).

The paper's update is :data:`PAPER` (``positives=sis``, ``td_lambda=0``, no target network, a
constant rate). RL owns its update (:meth:`RL.update`: Adam, the schedule, the target network),
so that the target network and the schedule are checkpointed with the optimiser; :meth:`RL.loss`
is one batch's loss.

Y_T = log φ must be finite: indicator potentials need a positive floor (task.epsilon > 0).

Stopping tasks (README "Stopping"): a sample is a finished z_1:ℓ padded after its stop. The value
at the stop step is the twist of the stopped sequence, whose optimum is φ: Y_ℓ = log φ(z) (and
G_ℓ = Y_ℓ), and for t < ℓ the soft-Bellman sum runs over the tokens the sampler allows at step
t+1 (no stop before ``min_len``, only stops at the cap T), so ψ* is the same recursion for the
target restricted to lengths ≤ T; with λ = 1, G_t = log φ + Σ_{t<j≤ℓ} log (p₀/q)(z_j | z_<j)
for the masked proposal q. The steps after ℓ are not in the loss (still divided by the cap T,
as SIXO's).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from smclm.errors import ConfigError
from smclm.methods.base import (
    TrainContext,
    allowed_steps,
    check_positives,
    live_positions,
    require_twist,
)
from smclm.models.twisted_lm import TwistedLM
from smclm.tasks.base import Task

POSITIVES = ("snis", "sis", "exact")

# The paper's update (rl_q_lsq): build_method("rl", **PAPER).
PAPER: dict[str, Any] = {
    "positives": "sis",
    "td_lambda": 0.0,
    "target_ema": 0.0,
    "lr_half_life": None,
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _last(live: Tensor) -> Tensor:
    """[K, 1]: the index of each row's last live step (its stop)."""
    return (live.sum(dim=1, keepdim=True) - 1).clamp(min=0)


class RL:
    """Soft-Q least squares. Options (configs/method/rl.yaml gives the reasons and defaults):

    positives     ``snis`` (default) | ``sis`` (the paper's rl_q_lsq) | ``exact`` (rl_qsigma_lsq)
    td_lambda     λ of the λ-return targets G_t (1, default: Monte-Carlo; 0: the paper's Y_t)
    target_ema    Polyak factor of the target network ψ̄ for Y_t (0: ψ̄ = ψ, the paper)
    lr_half_life  lr_n = lr / (1 + n / lr_half_life) after n updates (null: constant, the paper)
    """

    name = "rl"

    def __init__(
        self,
        positives: str = "snis",
        target_ema: float = 0.0,
        lr_half_life: float | None = None,
        td_lambda: float = 1.0,
    ) -> None:
        self.positives = check_positives("rl", positives, POSITIVES)
        self.needs_exact = positives == "exact"
        _check(
            0.0 <= float(target_ema) < 1.0,
            f"method.target_ema={target_ema} must be in [0, 1) (0: no target network)",
        )
        _check(
            lr_half_life is None or float(lr_half_life) > 0,
            f"method.lr_half_life={lr_half_life} must be positive, or null for a constant rate",
        )
        _check(
            0.0 <= float(td_lambda) <= 1.0,
            f"method.td_lambda={td_lambda} must be in [0, 1] (0: the paper's one-step target)",
        )
        self.td_lambda = float(td_lambda)
        self.target_ema = float(target_ema)
        self.lr_half_life = None if lr_half_life is None else float(lr_half_life)
        self.target: nn.Module | None = None  # the target network ψ̄ (target_ema > 0), after setup
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # -- the loss of one batch ----------------------------------------------------------------
    def regression(
        self,
        model: TwistedLM,
        task: Task,
        tokens: Tensor,
        log_phi: Tensor,
        cond: Tensor | None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """V [K, T] (with grad), the targets G [K, T] and the live steps [K, T] (None: every
        step) on tokens [K, T] with log φ [K] (a stopping task: ``lengths`` [K] or read from the
        tokens)."""
        if not torch.isfinite(log_phi).all():
            raise ConfigError(
                "rl regresses log ψ_T onto log φ, which is -inf or NaN on some samples; use a "
                "potential with a positive floor (task.epsilon > 0)"
            )
        ids, h, start = model.base_pass(task.prompt_ids, tokens)
        with torch.no_grad():
            log_p0_all = model.log_p0_from_hidden(h[:, start:])
        log_psi_all = model.twist.full(ids, h, start, cond)
        values = log_psi_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [K, T], with grad
        live = live_positions(task, tokens, lengths)  # None: fixed length
        with torch.no_grad():
            boot = log_psi_all if self.target is None else self.target.full(ids, h, start, cond)
            # Step t+1's all-vocab quantities sit at index t (paper-spec §0), so the targets of
            # steps 1..T-1 come from indices 1..T-1; a stopping task sums over the tokens the
            # sampler allows at step t+1 only (no stop before min_len, only stops at the cap).
            nxt = log_p0_all[:, 1:] + boot[:, 1:].float()
            allowed = allowed_steps(task, tokens.shape[1], nxt.shape[-1], nxt.device)
            if allowed is not None:
                nxt = nxt.masked_fill(~allowed[1:], -math.inf)
            y_next = torch.logsumexp(nxt, dim=-1)
            log_phi = log_phi.to(y_next)
            one_step = torch.cat([y_next, log_phi[:, None]], dim=1)  # Y_t
            at_stop = None
            if live is not None:  # Y_ℓ = log φ at each row's stop; the steps after it are unused
                steps = torch.arange(tokens.shape[1], device=live.device)[None]
                at_stop = steps == _last(live)
                one_step = torch.where(at_stop, log_phi[:, None], one_step)
            targets = one_step
            if self.td_lambda > 0:  # G_t = Y_t + λ (G_t+1 − V̄_t+1), G_T (G_ℓ) = log φ
                v_boot = boot.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).to(one_step)
                g = one_step[:, -1]
                returns = [g]
                for t in range(one_step.shape[1] - 2, -1, -1):
                    g = one_step[:, t] + self.td_lambda * (g - v_boot[:, t + 1])
                    if at_stop is not None:
                        g = torch.where(at_stop[:, t], one_step[:, t], g)
                    returns.append(g)
                targets = torch.stack(returns[::-1], dim=1)
        return values, targets, live

    def loss(self, batch: TrainContext) -> tuple[Tensor, dict[str, float]]:
        model, task, k = batch.model, batch.task, batch.n_particles
        require_twist("rl", model)
        with torch.no_grad():
            sis = batch.sample(ess_threshold=0.0)
        lengths = sis.lengths if task.stopping is not None else None
        values, targets, live = self.regression(
            model, task, sis.tokens, sis.log_phi, batch.cond, lengths
        )
        uniform = torch.full((k,), 1.0 / k, device=values.device)
        weights = [uniform]
        metrics: dict[str, float] = {}
        if self.positives == "snis":
            w = batch.normalize(sis.log_w).detach()  # within each o's rows on conditional tasks
            weights = [uniform + w.to(uniform)]
            metrics["train/ess_frac"] = float(1.0 / (w.pow(2).sum() * k))
        elif self.needs_exact:
            with torch.no_grad():
                pos_tokens = batch.draw_exact(k)
                pos_log_phi = task.log_phi(pos_tokens, batch.cond)
            v2, y2, live2 = self.regression(model, task, pos_tokens, pos_log_phi, batch.cond)
            values, targets = torch.cat([values, v2]), torch.cat([targets, y2])
            if live is not None and live2 is not None:
                live = torch.cat([live, live2])
            weights.append(
                torch.full((pos_tokens.shape[0],), 1.0 / pos_tokens.shape[0]).to(uniform)
            )
        u = torch.cat(weights)
        if live is not None:  # a stopping task: the steps t ≤ ℓ, still divided by the cap T
            # (masked before the difference: after the stop, ψ and its targets may be -inf)
            values, targets = values.where(live, 0.0), targets.where(live, 0.0)
        per_row = (values - targets).pow(2).mean(dim=1)  # ℓ(s) of every row
        loss = (u * per_row).sum()
        loss_q = per_row[:k].mean()
        metrics["train/loss_q"] = float(loss_q.detach())
        if self.positives != "sis":
            metrics["train/loss_sigma"] = float((loss - loss_q).detach())
        vals, tgts = values[:k].detach(), targets[:k]
        n_live = vals.numel() if live is None else live[:k].sum().clamp(min=1)
        metrics.update(
            {
                "train/loss": float(loss.detach()),
                "train/log_psi_mean": float(vals.sum() / n_live),  # over the live steps
                # log ψ of the full (fixed-length) or finished (stopping) sequence
                "train/log_psi_T_mean": float(
                    (vals[:, -1] if live is None else vals.gather(1, _last(live[:k]))).mean()
                ),
                "train/log_phi_mean": float(sis.log_phi.mean()),
                "train/target_mean": float(tgts.sum() / n_live),
                "train/log_z_hat": sis.log_z_hat,
            }
        )
        return loss, metrics

    # -- the update (the trainer calls setup once, then update per step) ----------------------
    def setup(self, batch: TrainContext, lr: float) -> None:
        model = batch.model
        require_twist("rl", model)
        params = [p for p in model.twist.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
        half = self.lr_half_life
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, (lambda n: 1.0) if half is None else (lambda n: 1.0 / (1.0 + n / half))
        )
        self.target = None
        if self.target_ema > 0:
            # The frozen base (a conditional head twist holds a reference to its body) is
            # shared, not copied.
            memo = {id(model.base): model.base, id(model.body): model.body}
            self.target = copy.deepcopy(model.twist, memo)
            for p in self.target.parameters():
                p.requires_grad_(False)

    def update(self, batch: TrainContext) -> dict[str, float]:
        _check(self.optimizer is not None, "RL.update needs RL.setup first")
        assert self.optimizer is not None and self.scheduler is not None
        loss, metrics = self.loss(batch)
        metrics["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.target is not None:
            with torch.no_grad():
                online = dict(batch.model.twist.named_parameters())
                for name, p in self.target.named_parameters():
                    p.lerp_(online[name].detach(), 1.0 - self.target_ema)
        return metrics

    def extra_modules(self) -> dict[str, nn.Module]:
        return {} if self.target is None else {"target": self.target}

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None and self.scheduler is not None, "call setup() first"
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.target is not None:
            state["target"] = self.target.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.scheduler is not None, "call setup() first"
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
