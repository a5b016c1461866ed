"""PPO: a proposal q_θ learned by PPO with a KL-in-the-reward penalty (baselines-spec Part A).

The target is σ ∝ p₀·φ. With the score R = log φ / β on the last token and the per-token penalty
−c·(log q − log p₀) (c = kl_coef, default 1/β), the return of a sequence is

    Σ_t r_t = R − c·log(q/p₀)(s) = log w(s) / β,      log w = log p₀ + log φ − log q,

so PPO maximises F_q / β = (log Z − KL(q‖σ)) / β: a mode-seeking learner of the same σ as the
twist learners. One update (spec A4/A7.3; TRL 0.7.7 ``PPOTrainer.step`` with the smclm fixes):

1. rollout, no grad, every module in eval mode: B samples s ~ q (SIS run with no resampling,
   temperature 1, KV cache, exactly T tokens); one teacher-forced pass for the old log q_t, the
   values V_t (read at the state *before* s_t) and log p₀_t; per-token rewards r_t; GAE(γ, λ)
   with V_{T+1} = 0; returns Ret = A + V; advantages whitened over all B·T tokens (unbiased
   variance, eps 1e-8) once, before any minibatching;
2. ``ppo_epochs`` passes over random minibatches (a fresh permutation from the run's generator
   each epoch): clipped policy loss + vf_coef · clipped value loss, one Adam step each. A
   minibatch whose mean ratio exceeds ``ratio_threshold`` is truly skipped (no optimizer step;
   ``ratio_skip=zero_loss`` reproduces TRL 0.7, where Adam still steps on a zero loss).

The batch is the trainer's ``smc.n_particles`` (B); ``mini_batch_size`` (null = B, as the paper
ran) must divide it. For conditional tasks (infilling) the trainer sets ``batch.cond`` with one o
per row before each update. The value head Linear(d → 1) (after an optional Dropout, TRL's
``ValueHead``) reads the policy's features (``full_with_features``) and belongs to this method:
it is saved in the method's state, not in ``params.safetensors``.

Fidelity flags (spec A6), all off by default; each changes only what is listed:

* ``freeze_value_head``   (A6.1) the value head stays at its initialisation (not optimised).
* ``reset_rng_to_zero``   (A6.2) after building the value head, reseed Python, NumPy, torch and
                          the run's sampling generator with 0, as TRL's ``PPOTrainer.__init__``.
* ``sample_in_train_mode`` (A6.3) draw the rollout samples with the policy in train mode
                          (dropout on); everything else stays in eval mode.

Metrics (spec A7.4): ``ppo/reward`` mean R; ``ppo/kl`` mean_b Σ_t (log q_old − log p₀);
``train/f_q`` β·mean_b Σ_t r_t (= mean log w with kl_estimator=k1); ``train/loss``; and per
minibatch averages ``ppo/{policy_loss,value_loss,clipfrac,vf_clipfrac,approxkl,policykl,entropy,
value_error,ratio_mean}``; ``ppo/skipped_minibatches``; ``ppo/{return_mean,value_mean}``;
``time/ppo_{rollout,optimize}_s``.

Stopping tasks (README "Stopping"): a sample is a finished sequence z_1:ℓ padded to T, and the
episode ends at its stop. log q is the sampler's masked proposal (no stop before ``min_len``,
only stops at the cap; :func:`~smclm.methods.base.proposal_log_softmax`), so Σ_t r_t = log w / β
still holds with log w = log p₀ + log φ − log q of the finished sequence; the score R is paid on
the stop token (step ℓ); the steps after it (:func:`~smclm.methods.base.live_positions`) have no
reward, value, advantage or loss (V_{ℓ+1} = 0 in GAE; the whitening, the policy and value losses
and their statistics are means over the live tokens). A fixed-length task computes exactly what
it did before.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smclm.errors import ConfigError, UserError
from smclm.methods.base import TrainContext, live_positions, proposal_log_softmax
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import SMCResult

RATIO_SKIPS = ("skip_step", "zero_loss")
KL_ESTIMATORS = ("k1", "k3")
REWARDS = ("log_phi_over_beta",)
OPTIMIZERS = ("adam", "adamw")
VALUE_INITS = ("torch_default", "normal", "zeros")
FIDELITY = ("freeze_value_head", "reset_rng_to_zero", "sample_in_train_mode")


# -- pure functions -------------------------------------------------------------------------------


def token_rewards(
    log_q: Tensor,
    log_p0: Tensor,
    score: Tensor,
    kl_coef: float,
    estimator: str = "k1",
    live: Tensor | None = None,
) -> Tensor:
    """r_t = −c·kl_t, plus the score R [B] on the last token. log_q, log_p0: [B, T] gathered.

    k1: kl_t = log q − log p₀ (the reference; Σ_t r_t = R − c·log(q/p₀)(s)).
    k3: kl_t = (p₀/q − 1) − log(p₀/q) ≥ 0 (lower variance per token, not an identity in sum).
    live [B, T] (stopping tasks): r_t = 0 after each row's stop ℓ, and R is paid at step ℓ.
    """
    if live is not None:
        zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
        log_q, log_p0 = torch.where(live, log_q, zero), torch.where(live, log_p0, zero)
        rewards = token_rewards(log_q, log_p0, torch.zeros_like(score), kl_coef, estimator)
        last = (live.sum(1) - 1).clamp(min=0)[:, None]  # the stop's column, ℓ − 1
        return rewards.scatter_add(1, last, score[:, None].to(rewards.dtype))
    if estimator == "k1":
        kl = log_q - log_p0
    else:
        log_ratio = log_p0 - log_q
        kl = torch.expm1(log_ratio) - log_ratio
    rewards = -kl_coef * kl
    rewards[:, -1] += score
    return rewards


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> Tensor:
    """Generalised advantages A_t = Σ_{k≥t} (γλ)^{k−t} δ_k, δ_t = r_t + γ V_{t+1} − V_t, V_{T+1}=0.

    rewards, values: [B, T] → [B, T]."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    t_len = rewards.shape[1]
    for t in reversed(range(t_len)):
        next_v = values[:, t + 1] if t + 1 < t_len else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv


def whiten(x: Tensor, eps: float = 1e-8, live: Tensor | None = None) -> Tensor:
    """(x − mean) / sqrt(var + eps) over all entries, with the unbiased variance (TRL ``whiten``).
    live (stopping tasks): mean and variance over the live entries; the others become 0."""
    if live is None:
        return (x - x.mean()) * torch.rsqrt(x.var(unbiased=True) + eps)
    vals = x[live]
    return ((x - vals.mean()) * torch.rsqrt(vals.var(unbiased=True) + eps)).masked_fill(~live, 0.0)


def ppo_loss(
    log_q: Tensor,
    log_q_old: Tensor,
    values: Tensor,
    values_old: Tensor,
    advantages: Tensor,
    returns: Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    live: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy loss + vf_coef · clipped value loss on a minibatch (all inputs [b, T]).

    Returns the loss and detached statistics (means over the b·T tokens; with ``live`` [b, T],
    a stopping task's steps up to each stop, over those tokens only)."""
    if live is None:  # every token: plain means (fixed-length tasks)
        keep = None

        def mean(x: Tensor) -> Tensor:
            return x.mean()

    else:  # a stopping task: means over the steps up to each stop
        keep = ~live
        n = live.sum().clamp(min=1)

        def mean(x: Tensor) -> Tensor:
            return x.masked_fill(keep, 0.0).sum() / n

    log_ratio = log_q - log_q_old
    if keep is not None:
        log_ratio = log_ratio.masked_fill(keep, 0.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = mean(torch.maximum(pg1, pg2))
    v_clipped = values_old + torch.clamp(values - values_old, -cliprange_value, cliprange_value)
    vf1 = (values - returns) ** 2
    vf2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * mean(torch.maximum(vf1, vf2))
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        # log_ratio is 0 after the stops, so ratio − 1 is too: the max is over live tokens
        stats = {
            "policy_loss": pg_loss.detach(),
            "value_loss": vf_loss.detach(),
            "clipfrac": mean((pg2 > pg1).float()),
            "vf_clipfrac": mean((vf2 > vf1).float()),
            "approxkl": 0.5 * mean(log_ratio**2),
            "policykl": mean(-log_ratio),
            "value_error": mean(vf1),
            "ratio_mean": mean(ratio),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
        }
    return loss, stats


# -- the method -----------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One update's batch, all fixed for the PPO epochs. [B, T] unless noted."""

    sample: SMCResult  # the SIS run that drew the tokens (its log_w is log p₀ + log φ − log q)
    ids: Tensor  # [B, P+T−1] teacher-forcing input (prompt + s_1..s_{T−1})
    hidden: Tensor  # [B, P+T−1, d] frozen base hidden states (reused by every epoch)
    cond: Tensor | None  # [B, c]
    log_q: Tensor
    log_p0: Tensor
    values: Tensor
    score: Tensor  # [B] R = log φ / β
    rewards: Tensor
    advantages: Tensor  # unwhitened A
    returns: Tensor  # A + V
    adv_hat: Tensor  # whitened A (what the policy loss uses)
    live: Tensor | None = None  # [B, T] the steps up to each stop (stopping tasks); None: all


def _options(value: Any, defaults: dict[str, Any], key: str) -> dict[str, Any]:
    """A dict option (``optimizer``, ``value_head``, ``fidelity``) merged over its defaults."""
    given = dict(value) if isinstance(value, Mapping) else {}
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"method.{key}={value!r} must be a mapping with keys {sorted(defaults)}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"method.{key} has unknown key(s) {', '.join(unknown)}; its keys are: "
            f"{', '.join(sorted(defaults))}"
        )
    return {**defaults, **given}


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


class PPO:
    """PPO on ``model.policy`` (spec A7). Options are those of ``configs/method/ppo.yaml``."""

    name = "ppo"
    needs_exact = False
    needs_policy, needs_twist = True, False  # trains method.policy; the model has no twist

    def __init__(
        self,
        mini_batch_size: int | None = None,
        ppo_epochs: int = 4,
        gamma: float = 1.0,
        lam: float = 0.95,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        kl_coef: float | None = None,
        kl_estimator: str = "k1",
        reward: str = "log_phi_over_beta",
        whiten_advantages: bool = True,
        ratio_threshold: float = 10.0,
        ratio_skip: str = "skip_step",
        max_grad_norm: float | None = None,
        optimizer: Mapping | None = None,
        value_head: Mapping | None = None,
        fidelity: Mapping | None = None,
    ) -> None:
        _require(
            mini_batch_size is None or (isinstance(mini_batch_size, int) and mini_batch_size > 0),
            f"method.mini_batch_size={mini_batch_size} must be a positive integer dividing "
            "smc.n_particles, or null (the whole batch)",
        )
        _require(
            isinstance(ppo_epochs, int) and ppo_epochs > 0,
            f"method.ppo_epochs={ppo_epochs} must be a positive integer (e.g. 4)",
        )
        _require(0.0 <= gamma <= 1.0, f"method.gamma={gamma} must be in [0, 1] (e.g. 1.0)")
        _require(0.0 <= lam <= 1.0, f"method.lam={lam} must be in [0, 1] (e.g. 0.95)")
        _require(cliprange > 0, f"method.cliprange={cliprange} must be positive (e.g. 0.2)")
        _require(
            cliprange_value > 0,
            f"method.cliprange_value={cliprange_value} must be positive (e.g. 0.2)",
        )
        _require(vf_coef >= 0, f"method.vf_coef={vf_coef} must be non-negative (e.g. 0.1)")
        _require(
            kl_coef is None or kl_coef >= 0,
            f"method.kl_coef={kl_coef} must be non-negative, or null for 1/β",
        )
        _require(
            kl_estimator in KL_ESTIMATORS,
            f"method.kl_estimator={kl_estimator} must be one of: {', '.join(KL_ESTIMATORS)}",
        )
        _require(reward in REWARDS, f"method.reward={reward} must be one of: {', '.join(REWARDS)}")
        _require(
            ratio_skip in RATIO_SKIPS,
            f"method.ratio_skip={ratio_skip} must be one of: {', '.join(RATIO_SKIPS)} "
            "(skip_step: no optimizer step; zero_loss: TRL 0.7's zeroed loss)",
        )
        _require(
            ratio_threshold > 0,
            f"method.ratio_threshold={ratio_threshold} must be positive (e.g. 10.0)",
        )
        _require(
            max_grad_norm is None or max_grad_norm > 0,
            f"method.max_grad_norm={max_grad_norm} must be positive, or null for no clipping",
        )
        opt = _options(
            optimizer,
            {"name": "adam", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
            "optimizer",
        )
        _require(
            opt["name"] in OPTIMIZERS,
            f"method.optimizer.name={opt['name']} must be one of: {', '.join(OPTIMIZERS)}",
        )
        _require(
            len(list(opt["betas"])) == 2,
            f"method.optimizer.betas={opt['betas']} must be two numbers, e.g. [0.9, 0.999]",
        )
        vh = _options(
            value_head, {"dropout": 0.0, "init": "torch_default", "trainable": True}, "value_head"
        )
        _require(
            vh["init"] in VALUE_INITS,
            f"method.value_head.init={vh['init']} must be one of: {', '.join(VALUE_INITS)}",
        )
        _require(
            0.0 <= float(vh["dropout"]) < 1.0,
            f"method.value_head.dropout={vh['dropout']} must be in [0, 1)",
        )
        fid = _options(fidelity, dict.fromkeys(FIDELITY, False), "fidelity")
        self.mini_batch_size = mini_batch_size
        self.ppo_epochs = ppo_epochs
        self.gamma, self.lam = float(gamma), float(lam)
        self.cliprange, self.cliprange_value = float(cliprange), float(cliprange_value)
        self.vf_coef = float(vf_coef)
        self.kl_coef = None if kl_coef is None else float(kl_coef)
        self.kl_estimator = kl_estimator
        self.whiten_advantages = bool(whiten_advantages)
        self.ratio_threshold = float(ratio_threshold)
        self.ratio_skip = ratio_skip
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.opt_cfg = opt
        self.vh_cfg = vh
        self.fidelity = {k: bool(v) for k, v in fid.items()}
        self.value_head: Any = None  # nn.Module after setup()
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.last_minibatches: list[dict[str, float]] = []  # per-minibatch stats of the last update

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, batch: TrainContext, lr: float) -> None:
        model = batch.model
        if model.policy is None:
            raise ConfigError(
                "method=ppo trains a policy but the model has none; set "
                "method.policy=full|mlp_head|separate_conditional|lora"
            )
        b = batch.n_particles
        mb = self.mini_batch_size or b
        _require(
            b % mb == 0,
            f"method.mini_batch_size={mb} does not divide the batch smc.n_particles={b}; "
            f"choose a divisor of {b} (or null for the whole batch)",
        )
        _require(
            not self.whiten_advantages or b * batch.task.output_len >= 2,
            "whitening advantages needs at least 2 tokens per batch; raise smc.n_particles or "
            "set method.whiten_advantages=false",
        )
        policy: Any = model.policy
        self.value_head = self._build_value_head(int(policy.feature_dim), model.device)
        trainable_vh = bool(self.vh_cfg["trainable"]) and not self.fidelity["freeze_value_head"]
        for p in self.value_head.parameters():
            p.requires_grad_(trainable_vh)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.params += [p for p in self.value_head.parameters() if p.requires_grad]
        opt_cls = torch.optim.Adam if self.opt_cfg["name"] == "adam" else torch.optim.AdamW
        self.optimizer = opt_cls(
            self.params,
            lr=lr,
            betas=(float(self.opt_cfg["betas"][0]), float(self.opt_cfg["betas"][1])),
            eps=float(self.opt_cfg["eps"]),
            weight_decay=float(self.opt_cfg["weight_decay"]),
        )
        self._eval(model)
        if self.fidelity["reset_rng_to_zero"]:  # A6.2: TRL's PPOTrainer calls set_seed(0)
            random.seed(0)
            np.random.seed(0)
            torch.manual_seed(0)
            batch.generator.manual_seed(0)

    def _build_value_head(self, d: int, device: torch.device) -> nn.Module:
        """TRL's ValueHead: Dropout(p) → Linear(d → 1), in float32."""
        linear = nn.Linear(d, 1)
        if self.vh_cfg["init"] == "normal":  # TRL v_head_init_strategy="normal", range 0.2
            nn.init.normal_(linear.weight, 0.0, 0.2)
            nn.init.zeros_(linear.bias)
        elif self.vh_cfg["init"] == "zeros":
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        p = float(self.vh_cfg["dropout"])
        head = nn.Sequential(nn.Dropout(p) if p > 0 else nn.Identity(), linear)
        return head.to(device=device, dtype=torch.float32)

    def _eval(self, model: TwistedLM) -> None:
        if model.policy is not None:
            model.policy.eval()
        if self.value_head is not None:
            self.value_head.eval()

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"value": self.value_head} if self.value_head is not None else {}

    def state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None and self.value_head is not None, "call setup() first"
        return {
            "optimizer": self.optimizer.state_dict(),
            "value_head": self.value_head.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None and self.value_head is not None, "call setup() first"
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- one update ---------------------------------------------------------------------------
    def beta(self, batch: TrainContext) -> float:
        return float(getattr(batch.task, "beta", 1.0))

    def _policy_pass(
        self,
        model: TwistedLM,
        ids: Tensor,
        hidden: Tensor,
        tokens: Tensor,
        cond: Tensor | None,
        task: Any = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced gathered log q [n, T], values [n, T] (state before s_t) and the full
        log q [n, T, V], with grad through the policy and the value head. A stopping ``task``:
        log q is the proposal as the sampler masks it."""
        start = ids.shape[1] - tokens.shape[1]  # = P − 1
        policy: Any = model.policy
        logits, feats = policy.full_with_features(ids, hidden, start, cond)
        if getattr(policy, "residual", True):  # log q = log_softmax(log p₀ + l)
            with torch.no_grad():
                log_p0_all = model.log_p0_from_hidden(hidden[:, start:])
            log_q_all = model.policy_log_q(log_p0_all, logits)
        else:  # full / lora: the copy's own logits (no p₀ needed)
            log_q_all = F.log_softmax(logits.float(), dim=-1)
        if task is not None and task.stopping is not None:
            log_q_all = proposal_log_softmax(task, log_q_all)
        log_q = log_q_all.gather(-1, tokens[..., None]).squeeze(-1)
        values = self.value_head(feats.float()).squeeze(-1)
        return log_q, values, log_q_all

    @torch.no_grad()
    def rollout(self, batch: TrainContext) -> Rollout:
        """Sample B sequences from q and compute everything the PPO epochs keep fixed."""
        model, task = batch.model, batch.task
        if self.fidelity["sample_in_train_mode"] and model.policy is not None:  # A6.3
            model.policy.train()  # dropout on while sampling
        try:
            sample = batch.sample(ess_threshold=0.0, n=batch.n_particles)
        finally:
            self._eval(model)
        if not torch.isfinite(sample.log_phi).all():
            raise UserError(
                "PPO needs a finite reward, but log φ = -inf on some samples; use a potential "
                "with a positive floor (e.g. task.epsilon=1e-3)"
            )
        tokens, cond = sample.tokens, batch.cond
        n = tokens.shape[0]
        prompt = task.prompt_ids.to(tokens.device)
        ids = torch.cat([prompt[None].expand(n, -1), tokens[:, :-1]], dim=1)
        hidden = model.body(input_ids=ids).last_hidden_state
        start = prompt.numel() - 1
        log_p0 = (
            model.log_p0_from_hidden(hidden[:, start:]).gather(-1, tokens[..., None]).squeeze(-1)
        )
        log_q, values, _ = self._policy_pass(model, ids, hidden, tokens, cond, task)
        beta = self.beta(batch)
        kl_coef = 1.0 / beta if self.kl_coef is None else self.kl_coef
        score = sample.log_phi.float() / beta
        live = live_positions(task, tokens, sample.lengths)  # None: fixed length
        if live is not None:  # nothing after the stop: V_{ℓ+1} = 0, r_t = 0 for t > ℓ
            log_q, log_p0 = log_q.masked_fill(~live, 0.0), log_p0.masked_fill(~live, 0.0)
            values = values.masked_fill(~live, 0.0)
        rewards = token_rewards(log_q, log_p0, score, kl_coef, self.kl_estimator, live)
        adv = gae(rewards, values, self.gamma, self.lam)
        returns = adv + values
        adv_hat = whiten(adv, live=live) if self.whiten_advantages else adv
        return Rollout(
            sample,
            ids,
            hidden,
            cond,
            log_q,
            log_p0,
            values,
            score,
            rewards,
            adv,
            returns,
            adv_hat,
            live,
        )

    def update(self, batch: TrainContext) -> dict[str, float]:
        assert self.optimizer is not None, "call setup() first"
        model = batch.model
        self._eval(model)
        t0 = time.perf_counter()
        ro = self.rollout(batch)
        t1 = time.perf_counter()
        b = ro.log_q.shape[0]
        mb = self.mini_batch_size or b
        gen = batch.generator
        stats_all: list[dict[str, float]] = []
        losses: list[float] = []
        skipped = 0
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(b, generator=gen, device=gen.device).to(ro.log_q.device)
            for idx in perm.split(mb):
                cond = None if ro.cond is None else ro.cond[idx.to(ro.cond.device)]
                tokens = ro.sample.tokens[idx]
                log_q, values, log_q_all = self._policy_pass(
                    model, ro.ids[idx], ro.hidden[idx], tokens, cond, batch.task
                )
                live = None if ro.live is None else ro.live[idx]
                loss, st = ppo_loss(
                    log_q,
                    ro.log_q[idx],
                    values,
                    ro.values[idx],
                    ro.adv_hat[idx],
                    ro.returns[idx],
                    self.cliprange,
                    self.cliprange_value,
                    self.vf_coef,
                    live,
                )
                with torch.no_grad():
                    if live is None:
                        st["entropy"] = -(log_q_all.exp() * log_q_all).sum(-1).mean()
                    else:  # masked tokens (q = 0) add nothing; the mean over live steps
                        plogp = log_q_all.exp() * log_q_all.masked_fill(log_q_all == -torch.inf, 0)
                        st["entropy"] = -plogp.sum(-1)[live].mean()
                stats = {k: float(v) for k, v in st.items()}
                skip = stats["ratio_mean"] > self.ratio_threshold
                stats["skipped"] = float(skip)
                stats_all.append(stats)
                losses.append(float(loss.detach()))
                if skip:
                    skipped += 1
                    if self.ratio_skip == "skip_step":
                        continue  # spec A6.6 fix: no optimizer step at all
                    loss = loss * 0.0  # TRL 0.7: zero loss, Adam still steps on its moments
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_minibatches = stats_all
        t2 = time.perf_counter()

        beta = self.beta(batch)
        metrics = {
            "train/loss": sum(losses) / len(losses),
            "train/f_q": beta * float(ro.rewards.sum(1).mean()),
            "ppo/reward": float(ro.score.mean()),
            "ppo/kl": float((ro.log_q - ro.log_p0).sum(1).mean()),
            "ppo/return_mean": float(_mean(ro.returns, ro.live)),
            "ppo/value_mean": float(_mean(ro.values, ro.live)),
            "ppo/skipped_minibatches": float(skipped),
            "time/ppo_rollout_s": t1 - t0,
            "time/ppo_optimize_s": t2 - t1,
        }
        for key in (
            "policy_loss",
            "value_loss",
            "clipfrac",
            "vf_clipfrac",
            "approxkl",
            "policykl",
            "entropy",
            "value_error",
            "ratio_mean",
        ):
            metrics[f"ppo/{key}"] = sum(s[key] for s in stats_all) / len(stats_all)
        return metrics


def _mean(x: Tensor, live: Tensor | None) -> Tensor:
    """The mean of x over its entries, or over the live ones (stopping tasks)."""
    return x.mean() if live is None else x[live].mean()
