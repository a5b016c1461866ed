"""GFlowNet fine-tuning of a proposal policy (Hu et al., ICLR 2024), on smclm's fixed-length
targets σ(s) ∝ p₀(s)·φ(s) (baselines-spec B4) and on variable-length ones (README "Stopping").

Fixed length: the state graph is a tree of depth T (no termination action), the terminal reward
is R(s) = σ̃(s) = p₀(s | s₀)·φ(s[, o]), optionally tempered to R^(1/τ_R) while training. Stopping
tasks (``task.stop``): the outputs are the finished sequences z = z_1:ℓ (z_ℓ a stop token ⊤,
m = ``task.min_len`` ≤ ℓ ≤ T, the stop counted) with R(z) = σ̃(z) = p₀(z_1:ℓ | s₀)·φ(z), and
the policy q is the sampler's **masked** proposal (no stop before step m, only stops at the cap
T, each step renormalised over the allowed tokens): log q(z) = Σ_{t≤ℓ} log q_masked(z_t | z_<t),
up to and including the stop, nothing after it; the forced stop at T has q = 1 for "some stop".
Losses (``loss``), all with the samples treated as fixed:

* ``auto`` (the config's default): ``modified_subtb`` when the task stops, else ``tb`` (decided
  in ``setup`` from the task; ``loss_kind`` reads ``tb`` until then).
* ``tb`` (the fixed-length default): trajectory balance with a learned log Z_θ,
  L = mean_s (log Z_θ + log q_θ(s) − log R(s)/τ_R)². At τ_R = 1 this is (log Z_θ − log w)² with
  the SIS log-weight log w = log σ̃ − log q. ``log_z=scalar``: one parameter; ``log_z=conditional``
  (conditional tasks): log Z_θ(o) = a + wᵀ ĝ(o), ĝ(o) the policy's own o-encoding (no grad)
  standardised with the pilot batch's statistics, a initialised at the pilot mean and w = 0
  (:class:`LogZ`). log Z_θ is **not** a bound on log Z: under on-policy
  sampling its optimum is F_q ≤ log Z; under replay/tempering it can exceed log Z.
* ``vargrad`` (= ``tb`` with ``log_z=batch_mean``, Hu's unimplemented "tb_no_z"): log Z_θ is
  replaced by stop-grad(mean of log R/τ_R − log q) over the rows sharing an o (the whole batch for
  unconditional tasks; needs ≥ 2 rows per o, ``method.particles_per_cond``).
* ``subtb``: λ-weighted sub-trajectory balance with learned intermediate flows
  log F_0 = log Z_θ(o), log F_t = log p₀(s_1:t) + log ψ_t(s_<t, s_t) (t = 1..T−1),
  log F_T = log R/τ_R; DB residuals D_t = log F_t + log q(s_t+1 | s_1:t) − log F_t+1 and
  C = [0, cumsum(D)]: L = Σ_{i<j} λ^(j−i−1) (C_j − C_i)² / Σ_{i<j} λ^(j−i−1) (batch mean).
  The (0, T) term is TB.

  **Flow head = ``model.twist``** (a deviation from B4.3's "scalar head on the hidden state
  *after* s_t"): f_θ(s_1:t) is the twist's all-vocabulary output log ψ_t(s_<t, ·) read at the
  sampled token s_t, i.e. computed from the hidden state *before* s_t, the convention every smclm
  twist uses. It costs nothing extra (one head on the same hidden state), and it lets the unchanged
  SMC sampler use the flow as its twists: the incremental log-weights of SMC with the policy as
  proposal and the flow as twist are log α_1 = log F_1 − log q_1 (F_0 := 1 inside SMC) and
  log α_t = −D_t−1 for t ≥ 2, summing to log w (baselines-spec B5). The world builds the
  configured twist only when ``loss=subtb``; it is zero-initialised, so F_t = p₀(s_1:t) at the
  start (the exact flow for φ ≡ 1), and trained with the policy in its own Adam group at the
  policy's learning rate. It is a separate network from the policy (B4.3: never tie f to the
  policy's logit modifier). Stopping tasks: row n's trajectory ends at ℓ_n, log F_ℓ = log R/τ_R,
  and its pairs are those with j ≤ ℓ_n (normalised per row, then the batch mean).
* ``modified_subtb`` (stopping tasks only; the loss of all of Hu's experiments, baselines-spec
  B2): every prefix is terminable, the reward of a prefix is the reward of "prefix + stop", and
  there is no learned flow and no log Z. A finished z = z_1:ℓ has the states z_1:i, i = 0..ℓ−1
  (the stop's own is not one). For state i

      log R_i = log Σ_{v∈⊤} σ̃(z_1:i v)^(1/τ_R)   (one stop: log σ̃(z_1:i ⊤)/τ_R),
      σ̃(z_1:i v) = p₀(z_1:i | s₀)·p₀(v | s₀, z_1:i)·φ(z_1:i v)  (p₀ unmasked, φ on "prefix + stop"),
      log F_i = log R_i − log q(⊤ | z_1:i),   q(⊤ | ·) = Σ_{v∈⊤} q_masked(v | ·),

  and with δ_i = log F_i + log q_masked(z_i+1 | z_1:i) − log F_i+1, C = [0, cumsum δ], the
  residual of the pair i < j is Hu's Eq. 3,
  log R_i + Σ_{k=i+1..j} log q(z_k | z_<k) + log q(⊤ | z_1:j) − log R_j − log q(⊤ | z_1:i)
  = C_j − C_i, and

      L = Σ_n Σ_{0≤i<j≤ℓ_n−1} λ^(j−i−1) (C_j − C_i)² / Σ_n Σ_{0≤i<j≤ℓ_n−1} λ^(j−i−1),

  λ = ``subtb_lambda`` (1, Hu's: uniform over all pairs), normalised over the **whole batch**
  as Hu's code (B2.3: long trajectories carry more pairs; a row with ℓ = 1 has none). The forced
  stop at the cap is respected: the last state z_1:T−1 can only stop, q(⊤ | z_1:T−1) = 1, so
  log F_T−1 = log R_T−1 (Hu's loss uses the unmasked policy there, the over-weighting of capped
  sequences that the sampler's correction removes). Prefixes shorter than the minimum
  (i + 1 < m: they may not stop) follow the spec (B2.1, Hu's code): log R_i = −99 (before the
  division by τ_R), and they stay in the pairs; their q(⊤ | z_1:i) is the **unmasked** policy's
  (the masked one is 0), a probability the sampler never uses, so −99 − log q(⊤ | z_1:i) acts
  as a free, learned flow of that state (at the optimum q(⊤ | ∅) = e^−99/Z). Its initial value is
  far from the true flow (≈ −97 instead of ≈ log Z), so with min_len > 1 the first updates have
  losses of 10³–10⁴ (cf. gfn-lm-tuning#6). With one stop token the loss is zero iff the masked
  q(z) ∝ R(z) on the batch's trajectories. With several stop tokens modified SubTB only fixes the
  total stop probability, so the loss adds the mean over terminable states i and v ∈ ⊤ of
  ε_i,v² (``stop_choice_loss``), ε_i,v = [log q(v | z_1:i) − log q(⊤ | z_1:i)] − [log R(z_1:i v)
  − log R(z_1:i ⊤)] (identically 0 with one stop). Replayed sequences get their prefix rewards
  recomputed (one p₀ pass, φ on every "prefix + stop": Σ_n (ℓ_n − m + 1)·|⊤| potential rows per
  update, in one ``task.log_phi`` call, or in the potential's ``prefix_log_phi`` where it has one:
  ``task=latent`` scores all prefixes of a row from one pass over it,
  ``scripts/bench_gfn_prefix.py``).

One update (B4.6), owned here (the trainer calls ``update``):

1. τ_R from the curriculum (τ_start → τ_end linearly over ``tau_r_updates`` updates; τ_end must be
   1 unless ``allow_tempered_target``: with τ_end ≠ 1 the run targets σ^(1/τ), not σ).
2. Behaviour per update: on-policy (p = 0.25), replay (0.25; on-policy when the buffer has no
   entries for this prompt/o) or tempered (0.5) with τ_pf ~ U(0.5, 2). Sampling goes through
   ``TrainContext.sample(ess_threshold=0)`` (SIS, no resampling, counted by the compute meter);
   log R = log p₀ + log φ comes from the sampler, untempered. Sampled batches (on-policy and
   tempered) are offered to the replay buffer (:mod:`smclm.methods.replay`; per prompt, top-k by
   log R, Hu's de-duplication; off by default on conditional tasks, whose o is fresh every update).
   Stopping tasks: the buffer stores each finished z_1:ℓ unpadded (de-duplication on the
   sequences themselves, as Hu's) and pads what it replays to T with the pad id.
3. log q_θ(s) is recomputed at temperature 1 by one teacher-forced pass with grad (exact when
   dropout is off; the sampler's log q is that of the tempered proposal), masked as the sampler
   masks on stopping tasks. SubTB adds the twist's flow head's log ψ, from the same base pass
   (``model.full_pass``); modified SubTB takes its prefix rewards' p₀ from that pass too.
4. One AdamW step (β = (0.9, 0.999), eps 1e-8, weight decay 0.01, no clipping): the policy with a
   linear warm-up lr·min(k/W, 1) over W = ``warmup`` updates (k = 0 at the first update, as in
   Hu's code), the flow head in its own group (same lr and warm-up, no weight decay), and log Z in
   its own Adam group at ``lr_z`` (no warm-up, no weight decay; the conditional weights w at
   lr_z/d on standardised o-encodings, see :class:`LogZ`). Modified SubTB has no log Z group.

log Z is initialised in ``setup`` to the mean tempered log-weight over ``pilot_samples`` on-policy
samples (B4.2), so the expected ∂L/∂log Z is ≈ 0 at the start (cf. gfn-lm-tuning#6, initial losses
of 10³–10⁴ with log Z = 0). Rewards must be positive (φ > 0, e.g. ``task.epsilon > 0``): a sample
with log R = −∞ has an infinite loss, and the update refuses it with the fix.

Metrics (per update):

====================  ==============================================================================
``train/loss``        the loss (same as ``gfn/loss``)
``gfn/loss``          TB / VarGrad / SubTB loss of this update
``gfn/log_z_param``   log Z_θ (mean over rows for ``conditional``; the batch mean for ``batch_mean``);
                      a parameter, **not** an estimate of log Z (not with ``modified_subtb``)
``gfn/log_f0``        ``modified_subtb``: mean log F_0 = log R_0 − log q(⊤ | ∅), Z's analogue
``gfn/mean_log_w``    mean of log σ̃ − log q over the batch, on-policy updates only (an F_q estimate)
``gfn/behaviour``     0 on-policy, 1 replay, 2 tempered
``gfn/tau_pf``        sampling temperature of this update (1 for on-policy and replay)
``gfn/buffer_size``   entries in the replay buffer (all prompts/o's), 0 when it is off
``gfn/tau_r``         reward temperature τ_R of this update
``gfn/lr``            the policy's learning rate this update (warm-up)
====================  ==============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from smclm.errors import ConfigError, UserError
from smclm.methods.base import TrainContext, task_demonstrations
from smclm.methods.replay import Key, ReplayBuffer
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import Stopping, stopped_sequence_log_probs
from smclm.tasks.base import Task

LOSSES = ("tb", "vargrad", "subtb", "modified_subtb")
LOG_Z = ("scalar", "conditional", "batch_mean")
ON_POLICY, REPLAY, TEMPERED = 0, 1, 2
BUFFER_DEFAULTS: dict[str, Any] = {
    "enabled": "auto",
    "capacity": 50,
    "sim_tolerance": 0.25,
    "seed_with_exact": False,
    "seed_with_task": False,
}


# -- pure pieces of the losses ------------------------------------------------------------------


class LogZ(nn.Module):
    """log Z_θ: a scalar a, or log Z_θ(o) = a + wᵀ ĝ(o) with w [d] (``cond_dim`` = d > 0).

    ĝ = (g − μ)/s standardises each coordinate of the o-encoding g(o) with the pilot batch's
    mean and standard deviation (buffers, set by :meth:`standardize_with`). Raw hidden states
    have coordinates of very different scales; with ĝ and w's learning rate lr_z/d (set by the
    learner), one Adam step moves log Z(o) by about lr_z whatever d, like the scalar a.
    """

    g_mean: Tensor
    g_std: Tensor

    def __init__(self, init: float = 0.0, cond_dim: int = 0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(init)))
        self.w = nn.Parameter(torch.zeros(cond_dim)) if cond_dim > 0 else None
        self.register_buffer("g_mean", torch.zeros(cond_dim))
        self.register_buffer("g_std", torch.ones(cond_dim))

    def standardize_with(self, g: Tensor) -> None:
        """Set μ and s from o-encodings g [N, d] (s ≥ 1e-3 of its mean; 1 for a single row)."""
        g = g.float()
        self.g_mean.copy_(g.mean(0))
        if g.shape[0] > 1:
            std = g.std(0)
            self.g_std.copy_(std.clamp(min=max(1e-3 * float(std.mean()), 1e-8)))

    def forward(self, g: Tensor) -> Tensor:
        """g: o-encodings [N, d] (scalar log Z: any [N, ·] tensor; only N is read) → [N]."""
        out = self.a.expand(g.shape[0])
        if self.w is not None:
            out = out + ((g.float() - self.g_mean) / self.g_std) @ self.w
        return out


def group_mean(x: Tensor, group_size: int | None) -> Tensor:
    """Mean of x [N] over consecutive groups of ``group_size`` rows (None: all rows), as [N]."""
    if group_size is None or group_size >= x.shape[0]:
        return x.mean().expand_as(x)
    return x.view(-1, group_size).mean(1).repeat_interleave(group_size)


def tb_residuals(log_z: Tensor, log_q: Tensor, log_r: Tensor, tau_r: float = 1.0) -> Tensor:
    """log Z_θ + log q(s) − log R(s)/τ_R, all [N]; L_TB is the mean of its square."""
    return log_z + log_q - log_r / tau_r


def flow_log_f(
    log_z: Tensor,
    log_p0: Tensor,
    log_psi: Tensor,
    log_r: Tensor,
    tau_r: float = 1.0,
    lengths: Tensor | None = None,
) -> Tensor:
    """log F_0..T [N, T+1]: log Z_θ [N]; log p₀(s_1:t) + log ψ_t(s_<t, s_t) from the per-token
    log p₀ [N, T] and log ψ [N, T] at the sampled tokens (t = 1..T−1); log R [N] / τ_R.

    lengths [N] (stopping tasks): row n's trajectory ends at ℓ_n, so log F_ℓ = log R/τ_R and the
    inner flows run over t = 1..ℓ−1; the entries after ℓ are 0 (never read by the masked loss)."""
    if lengths is None:
        inner = (log_p0.cumsum(1) + log_psi)[:, :-1]
        return torch.cat([log_z[:, None], inner, (log_r / tau_r)[:, None]], dim=1)
    inner = log_p0.cumsum(1) + log_psi  # [N, T]: t = 1..T
    pos = torch.arange(1, inner.shape[1] + 1, device=inner.device)[None]
    ell = lengths.to(inner.device)[:, None]
    zero = torch.zeros((), device=inner.device)
    inner = torch.where(pos < ell, inner, torch.where(pos == ell, (log_r / tau_r)[:, None], zero))
    return torch.cat([log_z[:, None], inner], dim=1)


def db_residuals(log_f: Tensor, log_q: Tensor) -> Tensor:
    """D_t = log F_t + log q(s_t+1 | s_1:t) − log F_t+1 for t = 0..T−1: [N, T] from
    log F [N, T+1] and per-token log q [N, T]."""
    return log_f[:, :-1] + log_q - log_f[:, 1:]


def _pair_weights(n_states: int, lam: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """(weight [S, S] = λ^(j−i−1) for i < j else 0, j index [S]) over S states."""
    pos = torch.arange(n_states, device=device)
    gap = pos[None, :] - pos[:, None]  # j − i
    weight = torch.where(
        gap > 0,
        torch.tensor(float(lam), device=device).pow((gap - 1).clamp(min=0).float()),
        torch.zeros((), device=device),
    )
    return weight, pos


def subtb_loss(residuals: Tensor, lam: float = 1.0, lengths: Tensor | None = None) -> Tensor:
    """Σ_{0≤i<j≤T} λ^(j−i−1) (C_j − C_i)² / Σ λ^(j−i−1), C = [0, cumsum(D)], batch mean.

    residuals: DB residuals D [N, T]. C_j − C_i = Σ_{i≤t<j} D_t; the (0, T) pair is TB.
    lengths [N] (stopping tasks): row n's pairs are those with j ≤ ℓ_n (its D_t for t ≥ ℓ_n are
    ignored), normalised by its own Σ λ^(j−i−1), then the batch mean."""
    n, t_len = residuals.shape
    if lengths is not None:
        t_pos = torch.arange(t_len, device=residuals.device)[None]
        live = t_pos < lengths.to(residuals.device)[:, None]
        residuals = torch.where(live, residuals, torch.zeros((), device=residuals.device))
    c = torch.cat([residuals.new_zeros(n, 1), residuals.cumsum(1)], dim=1)  # [N, T+1]
    diff = c[:, None, :] - c[:, :, None]  # [N, i, j] = C_j − C_i
    weight, pos = _pair_weights(t_len + 1, lam, residuals.device)
    if lengths is None:
        return ((weight * diff.pow(2)).sum((1, 2)) / weight.sum()).mean()
    w = weight[None] * (pos[None, None, :] <= lengths.to(residuals.device)[:, None, None])
    return ((w * diff.pow(2)).sum((1, 2)) / w.sum((1, 2))).mean()


UNTERMINABLE_LOG_R = -99.0  # log R of a prefix that may not stop (shorter than min_len): Hu's


def modified_subtb_loss(
    log_r: Tensor,
    log_pterm: Tensor,
    log_pf: Tensor,
    lengths: Tensor,
    lam: float = 1.0,
    states: Tensor | None = None,
) -> Tensor:
    """Hu et al.'s modified SubTB (baselines-spec B2.2–B2.3), every prefix terminable.

    Row n is a finished sequence z_1:ℓ (ℓ = lengths[n], its stop z_ℓ counted); its states are the
    prefixes z_1:i, i = 0..ℓ−1 (the stop's own state is not one). Inputs, i = 0..L−1 (L ≥ ℓ):

    * log_r [N, L]: log R_i = log R(z_1:i ⊤)/τ_R (tempered), −99/τ_R where z_1:i may not stop;
    * log_pterm [N, L]: log q(⊤ | z_1:i);
    * log_pf [N, L−1]: log q(z_i+1 | z_1:i) of transition i → i+1.

    With log F_i = log R_i − log q(⊤ | z_1:i) and δ_i = log F_i + log pf_i − log F_i+1,
    C = [0, cumsum δ]: L = Σ_n Σ_{0≤i<j≤ℓ_n−1} λ^(j−i−1) (C_j − C_i)² / Σ_n Σ_{i<j} λ^(j−i−1),
    normalised over the **whole batch** (long trajectories carry more pairs, as Hu's code); 0
    when no row has a pair (every ℓ = 1). Entries past a row's last state are ignored (they may
    hold anything finite).

    ``states`` [N, L] bool (a tool's forced steps, :mod:`smclm.models.twisted_lm`): which
    prefixes are states; a prefix followed by a forced token is not (the tool's tokens come with
    the action before them), so no pair starts or ends there. C_j − C_i telescopes to
    log F_i + Σ log pf − log F_j, so the log F of a non-state never enters (it is set to 0), and
    the forced transitions add their log pf = 0; λ counts positions, not states."""
    n, n_states = log_r.shape
    dev = log_r.device
    zero = torch.zeros((), device=dev)
    log_f = log_r - log_pterm
    if states is not None:
        log_f = torch.where(states, log_f, zero)
    delta = log_f[:, :-1] + log_pf - log_f[:, 1:]  # [N, L−1]
    ell = lengths.to(dev)[:, None]
    live = torch.arange(1, n_states, device=dev)[None] <= ell - 1  # transition into state i+1
    delta = torch.where(live, delta, zero)
    c = torch.cat([delta.new_zeros(n, 1), delta.cumsum(1)], dim=1)  # [N, L]
    diff = c[:, None, :] - c[:, :, None]  # [N, i, j]
    weight, pos = _pair_weights(n_states, lam, dev)
    w = weight[None] * (pos[None, None, :] <= ell[:, :, None] - 1)
    if states is not None:
        w = w * (states[:, :, None] & states[:, None, :])
    total = w.sum()  # 0 when every row has ℓ = 1: then the numerator is 0 too (graph kept)
    return (w * diff.pow(2)).sum() / torch.where(total > 0, total, torch.ones_like(total))


def stop_choice_loss(log_q_stop: Tensor, log_r_stop: Tensor, valid: Tensor) -> Tensor:
    """With several stop tokens ⊤ = {v_1..v_S}: which stop a terminating prefix takes.

    ε_i,v = [log q(v | z_1:i) − log q(⊤ | z_1:i)] − [log R(z_1:i v) − log R(z_1:i ⊤)] (R tempered),
    from log q [N, L, S] and log R [N, L, S] per stop token; the mean of ε² over the ``valid``
    [N, L] states and the S stops. Identically 0 with one stop token; modified SubTB only
    constrains the total stop probability, this the split among the stops."""
    eps = (log_q_stop - torch.logsumexp(log_q_stop, -1, keepdim=True)) - (
        log_r_stop - torch.logsumexp(log_r_stop, -1, keepdim=True)
    )
    eps = torch.where(valid[..., None], eps, torch.zeros((), device=eps.device))
    count = valid.sum() * log_q_stop.shape[-1]
    return eps.pow(2).sum() / count.clamp(min=1)


def step_log_norm(log_q_all: Tensor, stopping: Stopping, output_len: int) -> Tensor:
    """log of the mass the stopping sampler's mask leaves at each step [N, L] from the policy's
    log q [N, L, V] (position p is step t = p + 1): before min_len the non-stop tokens, at the
    cap only the stops, 0 in between. log q(v) − this is the masked proposal the sampler draws
    from (``Stopping.mask``); computed over the allowed tokens only, so it stays finite."""
    n, length, v = log_q_all.shape
    norm = log_q_all.new_zeros(n, length)
    cols = []
    for p in range(length):
        t = p + 1
        if not stopping.min_len <= t < output_len:
            allowed = stopping.allowed(t, output_len, v, log_q_all.device)
            cols.append((p, torch.logsumexp(log_q_all[:, p].masked_fill(~allowed, -math.inf), -1)))
    if cols:
        idx = torch.tensor([p for p, _ in cols], device=log_q_all.device)
        norm = norm.index_copy(1, idx, torch.stack([c for _, c in cols], 1))
    return norm


# -- the learner ---------------------------------------------------------------------------------


class GFN:
    """GFlowNet fine-tuning of ``model.policy``; options are the keys of configs/method/gfn.yaml
    (see the module docstring)."""

    name = "gfn"
    needs_policy = True  # trains method.policy; a twist only as SubTB's flow head (needs_twist)

    def __init__(
        self,
        loss: str = "auto",
        log_z: str = "scalar",
        lr_z: float = 0.1,
        subtb_lambda: float = 1.0,
        batch_size: int | None = None,
        p_on_policy: float = 0.25,
        p_replay: float = 0.25,
        p_tempered: float = 0.5,
        tau_pf: tuple[float, float] | list[float] = (0.5, 2.0),
        tau_r_start: float = 1.0,
        tau_r_end: float = 1.0,
        tau_r_updates: int = 0,
        allow_tempered_target: bool = False,
        buffer: Mapping[str, Any] | None = None,
        warmup: int = 20,
        weight_decay: float = 0.01,
        pilot_samples: int = 100,
    ) -> None:
        if loss not in (*LOSSES, "auto"):
            raise ConfigError(
                f"method.loss={loss} is not a GFlowNet loss; choose one of: {', '.join(LOSSES)}, "
                "or auto (modified_subtb for a task that stops, tb otherwise)"
            )
        self.loss_requested = loss
        if loss == "auto":  # tb until setup sees the task: modified_subtb when it stops
            loss = "tb"
        if loss == "modified_subtb" and log_z != "scalar":
            raise ConfigError(
                f"method.loss=modified_subtb has no log Z (its flows are R/q(stop)), so "
                f"method.log_z={log_z} does not apply; set method.log_z=scalar, or "
                "method.loss=tb to learn log Z"
            )
        if log_z not in LOG_Z:
            raise ConfigError(
                f"method.log_z={log_z} is not valid; choose one of: {', '.join(LOG_Z)}"
            )
        if loss == "vargrad":  # VarGrad is TB with the batch-mean log Z
            if log_z == "conditional":
                raise ConfigError(
                    "method.loss=vargrad uses the batch-mean log Z (grouped by o), not "
                    "log_z=conditional; set method.log_z=batch_mean, or method.loss=tb to keep "
                    "log_z=conditional"
                )
            loss, log_z = "tb", "batch_mean"
        if loss == "subtb" and log_z == "batch_mean":
            raise ConfigError(
                "method.loss=subtb needs a learned F_0 = log Z_θ; set method.log_z=scalar "
                "(or conditional)"
            )
        if tau_r_end != 1.0 and not allow_tempered_target:
            raise ConfigError(
                f"method.tau_r_end={tau_r_end} trains toward σ^(1/τ_R), not σ; set "
                "method.tau_r_end=1.0, or method.allow_tempered_target=true to target the "
                "tempered σ on purpose"
            )
        for key, val in (("tau_r_start", tau_r_start), ("tau_r_end", tau_r_end)):
            if not val > 0:
                raise ConfigError(f"method.{key}={val} must be positive (e.g. 1.0)")
        probs = [float(p_on_policy), float(p_replay), float(p_tempered)]
        if min(probs) < 0 or sum(probs) <= 0:
            raise ConfigError(
                f"method.p_on_policy/p_replay/p_tempered={probs} must be non-negative with a "
                "positive sum (e.g. 0.25, 0.25, 0.5)"
            )
        lo, hi = (float(x) for x in tau_pf)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"method.tau_pf=[{lo}, {hi}] must satisfy 0 < min ≤ max (e.g. [0.5, 2.0])"
            )
        buf: dict[str, Any] = dict(BUFFER_DEFAULTS)
        unknown = sorted(set(buffer or {}) - set(buf))
        if unknown:
            raise ConfigError(
                f"method.buffer does not take {', '.join(unknown)}; its keys are: {', '.join(buf)}"
            )
        buf.update(dict(buffer or {}))
        if buf["enabled"] not in ("auto", True, False):
            raise ConfigError(f"method.buffer.enabled={buf['enabled']} must be auto, true or false")
        if int(buf["capacity"]) < 1:
            raise ConfigError(
                f"method.buffer.capacity={buf['capacity']} must be a positive integer"
            )
        checks: tuple[tuple[str, object, bool], ...] = (
            ("lr_z", lr_z, lr_z > 0),
            ("subtb_lambda", subtb_lambda, subtb_lambda > 0),
            ("warmup", warmup, warmup >= 0),
            ("pilot_samples", pilot_samples, pilot_samples >= 0),
            ("tau_r_updates", tau_r_updates, tau_r_updates >= 0),
            ("batch_size", batch_size, batch_size is None or batch_size > 0),
        )
        for key, value, ok in checks:
            if not ok:
                raise ConfigError(
                    f"method.{key}={value} is out of range; see configs/method/gfn.yaml"
                )
        self.loss_kind, self.log_z_kind = loss, log_z
        self.lr_z, self.subtb_lambda = float(lr_z), float(subtb_lambda)
        self.batch_size = batch_size
        self.probs = [p / sum(probs) for p in probs]
        self.tau_pf = (lo, hi)
        self.tau_r_start, self.tau_r_end = float(tau_r_start), float(tau_r_end)
        self.tau_r_updates = int(tau_r_updates)
        self.buffer_cfg = buf
        self.warmup, self.weight_decay = int(warmup), float(weight_decay)
        self.pilot_samples = int(pilot_samples)
        self.needs_exact = bool(buf["seed_with_exact"])
        self.log_z: LogZ | None = None
        self.buffer: ReplayBuffer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr = 0.0
        self.n_updates = 0

    @property
    def needs_twist(self) -> bool:
        """SubTB's flow head is the twist (baselines-spec B4.3); TB, VarGrad and modified SubTB
        have none."""
        return self.loss_kind == "subtb"

    # -- schedules -----------------------------------------------------------------------------
    def tau_r(self, k: int) -> float:
        """Reward temperature at update k (0-based): τ_start → τ_end linearly over H updates."""
        if self.tau_r_updates == 0:
            return self.tau_r_end
        frac = min(k / self.tau_r_updates, 1.0)
        return self.tau_r_start + (self.tau_r_end - self.tau_r_start) * frac

    def policy_lr(self, k: int) -> float:
        """lr·min(k/W, 1): Hu's warm-up from 0 (the first update has lr 0)."""
        return self.lr if self.warmup == 0 else self.lr * min(k / self.warmup, 1.0)

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, batch: TrainContext, lr: float) -> None:
        model, task = batch.model, batch.task
        if model.policy is None:
            raise ConfigError(
                "method=gfn trains a proposal policy but the model has none; set "
                "method.policy=mlp_head|full|lora|separate_conditional"
            )
        self._resolve_loss(task)
        uses_log_z = self.log_z_kind != "batch_mean" and self.loss_kind != "modified_subtb"
        if uses_log_z and len(task.train_prompts) > 1:
            raise ConfigError(
                f"method.loss={self.loss_kind} learns one log Z, but training draws from "
                f"{len(task.train_prompts)} prompts, each with its own Z; use "
                "method.loss=modified_subtb (no log Z) or vargrad, or train on one prompt "
                "(task.prompt_index=<i>)"
            )
        if self.loss_kind == "subtb" and model.twist is None:
            raise ConfigError(
                "method.loss=subtb uses the twist as its flow head but the model has none; "
                "set twist=mlp|linear|separate"
            )
        conditional = task.cond_len > 0
        if self.log_z_kind == "conditional" and not conditional:
            raise ConfigError(
                f"method.log_z=conditional needs a conditional task, but task {task.name} has "
                "no conditioning tokens; set method.log_z=scalar"
            )
        if conditional and self.batch_size not in (None, batch.n_particles):
            raise ConfigError(
                f"method.batch_size={self.batch_size} must equal smc.n_particles on conditional "
                "tasks (one row per o); set method.batch_size=null"
            )
        rows_per_group = batch.group_size if conditional else self.batch_size or batch.n_particles
        if self.log_z_kind == "batch_mean" and (rows_per_group or 1) < 2:
            raise ConfigError(
                "method.loss=vargrad (log_z=batch_mean) needs at least 2 samples per o; set "
                "method.particles_per_cond=4 (or more), or use method.loss=tb"
            )
        enabled = self.buffer_cfg["enabled"]
        if enabled == "auto":
            enabled = not conditional
        if enabled:
            self.buffer = ReplayBuffer(
                int(self.buffer_cfg["capacity"]), float(self.buffer_cfg["sim_tolerance"])
            )
        if self.needs_exact and self.buffer is None:
            raise ConfigError(
                "method.buffer.seed_with_exact=true needs the replay buffer; set "
                "method.buffer.enabled=true"
            )

        self.lr = float(lr)
        groups = [
            {
                "params": [p for p in model.policy.parameters() if p.requires_grad],
                "weight_decay": self.weight_decay,
                "name": "policy",
            }
        ]
        if model.twist is not None and self.loss_kind == "subtb":
            groups.append(
                {
                    "params": [p for p in model.twist.parameters() if p.requires_grad],
                    "weight_decay": 0.0,
                    "name": "flow",
                }
            )
        if self.log_z_kind != "batch_mean" and self.loss_kind != "modified_subtb":
            self.log_z = self._pilot_log_z(batch)
            groups.append(
                {"params": [self.log_z.a], "lr": self.lr_z, "weight_decay": 0.0, "name": "log_z"}
            )
            if self.log_z.w is not None:  # lr_z/d: see LogZ
                lr_w = self.lr_z / self.log_z.w.numel()
                groups.append(
                    {"params": [self.log_z.w], "lr": lr_w, "weight_decay": 0.0, "name": "log_z_w"}
                )
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.lr, betas=(0.9, 0.999), eps=1e-8
        )
        if bool(self.buffer_cfg.get("seed_with_task", False)):
            self._seed_with_task(batch)
        if self.needs_exact and not conditional:
            pool = batch.exact_pool
            if pool is None or self.buffer is None:
                raise UserError("method.buffer.seed_with_exact=true but there is no exact pool")
            self.buffer.add_batch(
                [()] * pool.shape[0], pool, _log_r(batch, pool, None), _lengths(task, pool)
            )

    @torch.no_grad()
    def _seed_with_task(self, batch: TrainContext) -> None:
        """``method.buffer.seed_with_task=true``: offer the task's own demonstrations (task=latent:
        the labelled rows' z, :meth:`~smclm.tasks.latent.LatentPotential.seed_sequences`) to the
        replay buffer under their prompts, with their untempered log R (Hu et al.'s buffer
        seeded with the labelled rationales)."""
        from dataclasses import replace

        if self.buffer is None:
            raise ConfigError(
                "method.buffer.seed_with_task=true needs the replay buffer; set "
                "method.buffer.enabled=true"
            )
        task = batch.task
        by_prompt = task_demonstrations(task, "method.buffer.seed_with_task=true")
        for prompt_ids, tokens in by_prompt:
            t = task.for_prompt(prompt_ids)
            sub = replace(batch, task=t)
            tokens = tokens.to(batch.model.device)
            keys = _keys(t, None, tokens.shape[0])
            self.buffer.add_batch(keys, tokens, _log_r(sub, tokens, None), _lengths(t, tokens))

    def _resolve_loss(self, task: Task) -> None:
        """``loss=auto``: modified SubTB for a task that stops, TB otherwise (decided here, from
        the task); check that the loss fits the task."""
        stops = task.stopping is not None
        if self.loss_requested == "auto" and stops:
            if self.log_z_kind != "scalar":
                raise ConfigError(
                    f"task {task.name} stops, so method.loss defaults to modified_subtb, which "
                    f"has no log Z: method.log_z={self.log_z_kind} does not apply; set "
                    "method.loss=tb (or vargrad) to use it, or method.log_z=scalar"
                )
            self.loss_kind = "modified_subtb"
        if self.loss_kind == "modified_subtb" and not stops:
            raise ConfigError(
                f"method.loss=modified_subtb needs a task that stops (every prefix terminable), "
                f"but task {task.name} has fixed-length outputs; set method.loss=tb (or subtb, "
                "vargrad), or give the task stop tokens (task.stop)"
            )

    @torch.no_grad()
    def _pilot_log_z(self, batch: TrainContext) -> LogZ:
        """log Z_θ ← mean tempered log-weight of ``pilot_samples`` on-policy samples (B4.2)."""
        features = None
        cond = None
        n = max(self.pilot_samples, 1)
        if batch.task.cond_len > 0:
            cond = batch.cond
            if cond is None or cond.shape[0] != n:
                sample_joint = getattr(batch.task, "sample_joint", None)
                if sample_joint is None:
                    raise UserError(
                        f"task {batch.task.name} has no sample_joint to draw pilot o's for log Z"
                    )
                _, cond = sample_joint(batch.model, n, batch.generator)
            if self.log_z_kind == "conditional":
                features = _cond_features(batch.model, cond, n)
        cond_dim = 0 if features is None else int(features.shape[-1])
        log_z = LogZ(0.0, cond_dim).to(batch.model.device)
        if features is not None:
            log_z.standardize_with(features)
        if self.pilot_samples == 0:
            return log_z
        res = batch.sample(ess_threshold=0.0, n=n, cond=cond)
        log_w = (res.log_p0 + res.log_phi) / self.tau_r(0) - res.log_q
        _check_finite(res.log_p0 + res.log_phi)
        log_z.a.fill_(float(log_w.mean()))
        return log_z

    # -- one update --------------------------------------------------------------------------------
    def update(self, batch: TrainContext) -> dict[str, float]:
        if self.optimizer is None:
            raise RuntimeError("call setup(batch, lr) before update")
        task = batch.task
        k = self.n_updates
        tau_r = self.tau_r(k)
        cond = batch.cond
        n = batch.n_particles if cond is not None else (self.batch_size or batch.n_particles)
        keys = _keys(task, cond, n)
        group = batch.group_size if cond is not None else None
        if self.buffer is not None and self.needs_exact and cond is not None:
            if batch.exact_pool is not None:  # B4.5: seed with the exact s paired with each o
                pool = batch.exact_pool
                self.buffer.add_batch(keys, pool, _log_r(batch, pool, cond), _lengths(task, pool))

        mode, tau_pf = self._draw_behaviour(batch.generator, keys, group)
        if mode == REPLAY:
            tokens, log_r = self._replay(batch, keys, n, group)
        else:
            with torch.no_grad():
                res = batch.sample(ess_threshold=0.0, n=n, temperature=tau_pf)
            tokens, log_r = res.tokens, res.log_p0 + res.log_phi  # untempered log σ̃
            _check_finite(log_r)
            if self.buffer is not None:
                lengths = res.lengths if task.stopping is not None else None
                self.buffer.add_batch(keys, tokens, log_r, lengths)

        loss, log_z, log_q = self.batch_loss(batch, tokens, log_r, tau_r, cond, group)

        lr = self.policy_lr(k)
        for g in self.optimizer.param_groups:
            if g["name"] in ("policy", "flow"):
                g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.n_updates += 1

        metrics = {
            "train/loss": float(loss.detach()),
            "gfn/loss": float(loss.detach()),
            self._z_metric(): float(log_z.detach().mean()),
            "gfn/behaviour": float(mode),
            "gfn/tau_pf": float(tau_pf),
            "gfn/buffer_size": float(len(self.buffer) if self.buffer is not None else 0),
            "gfn/tau_r": float(tau_r),
            "gfn/lr": float(lr),
        }
        if mode == ON_POLICY:
            metrics["gfn/mean_log_w"] = float((log_r - log_q).detach().mean())
        return metrics

    def _z_metric(self) -> str:
        return "gfn/log_f0" if self.loss_kind == "modified_subtb" else "gfn/log_z_param"

    def batch_loss(
        self,
        batch: TrainContext,
        tokens: Tensor,
        log_r: Tensor,
        tau_r: float,
        cond: Tensor | None = None,
        group: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The configured loss of sequences tokens [N, T] (finished and padded on a stopping
        task) with untempered log R [N], from one teacher-forced pass at temperature 1 with grad
        through the policy (and SubTB's flow head). Returns (loss, log Z_θ [N] — log F_0 for
        modified SubTB —, log q(s) [N] of the sampler's proposal, with grad)."""
        model, task = batch.model, batch.task
        n = tokens.shape[0]
        stopping = task.stopping
        # one base pass gives log p₀, the policy's log q and (SubTB) the flow head's log ψ
        log_p0_all, log_psi_all, log_q_all = model.full_pass(task.prompt_ids, tokens, cond)
        assert log_q_all is not None  # setup checked that the policy exists
        idx = tokens[..., None]
        log_q_tok = log_q_all.gather(-1, idx).squeeze(-1)  # [N, T]
        lengths = None
        if stopping is not None:  # the sampler's masked proposal, 0 after each row's stop
            lengths = stopping.lengths(tokens)
            norm = step_log_norm(log_q_all, stopping, task.output_len)
            live = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)[None]
            live = live <= lengths[:, None]
            log_q_tok = torch.where(live, log_q_tok - norm, torch.zeros((), device=norm.device))
        log_q = log_q_tok.sum(1)
        if self.loss_kind == "modified_subtb":
            assert stopping is not None and lengths is not None  # setup checked
            forced = model.forced_targets(tokens)  # a tool's forced steps (None: none)
            loss, log_f0 = self._modified_subtb(
                task, tokens, lengths, cond, tau_r, log_p0_all, log_q_all, norm, forced
            )
            return loss, log_f0, log_q
        if self.log_z is None:  # batch_mean (VarGrad)
            log_z = group_mean((log_r / tau_r - log_q).detach(), group)
        else:
            features_of = cond if self.log_z_kind == "conditional" else None
            log_z = self.log_z(_cond_features(model, features_of, n))
        if self.loss_kind == "subtb":
            assert log_psi_all is not None  # setup checked that the flow head (twist) exists
            log_psi = log_psi_all.gather(-1, idx).squeeze(-1)
            log_p0_tok = log_p0_all.gather(-1, idx).squeeze(-1)
            log_f = flow_log_f(log_z, log_p0_tok, log_psi, log_r, tau_r, lengths)
            loss = subtb_loss(db_residuals(log_f, log_q_tok), self.subtb_lambda, lengths)
        else:
            loss = tb_residuals(log_z, log_q, log_r, tau_r).pow(2).mean()
        return loss, log_z, log_q

    def _modified_subtb(
        self,
        task: Task,
        tokens: Tensor,
        lengths: Tensor,
        cond: Tensor | None,
        tau_r: float,
        log_p0_all: Tensor,
        log_q_all: Tensor,
        norm: Tensor,
        forced: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Modified SubTB (+ the stop-choice term with several stops) of finished sequences;
        returns (loss, log F_0 [N]). See the module docstring. ``forced`` [N, T]: the tool's
        forced token at each step (−1: none); a prefix followed by one is not a state."""
        stopping = task.stopping
        assert stopping is not None
        t_len = tokens.shape[1]
        dev = tokens.device
        stops = torch.tensor(stopping.stop_ids, device=dev)
        idx = tokens[..., None]
        with torch.no_grad():  # rewards: the frozen p₀ and φ
            lp0_tok = log_p0_all.gather(-1, idx).squeeze(-1)
            lp0_prefix = torch.cat([lp0_tok.new_zeros(tokens.shape[0], 1), lp0_tok.cumsum(1)], 1)
            state = torch.arange(t_len, device=dev)[None]  # i = 0..T−1
            valid = state <= (lengths[:, None] - 1)  # the row's states z_1:i, i < ℓ
            states = None if forced is None else forced < 0  # z_i+1 is the policy's
            if states is not None:
                valid = valid & states
            terminable = (state + 1 >= stopping.min_len) & valid
            log_p0_stop = lp0_prefix[:, :t_len, None] + log_p0_all.index_select(-1, stops)
            log_phi = task.log_phi_from_log_p0(log_p0_stop)  # φ a power of p̃₀: no extra pass
            if log_phi is None:
                log_phi = _prefix_log_phi(task, tokens, terminable, cond)  # [N, T, S]
            else:
                log_phi = log_phi.masked_fill(~terminable[..., None], 0.0)
            log_r_stop = (log_p0_stop + log_phi) / tau_r
            log_r = torch.where(
                terminable,
                torch.logsumexp(log_r_stop, -1),
                torch.full((), UNTERMINABLE_LOG_R / tau_r, device=dev),
            )
        log_q_stop = log_q_all.index_select(-1, stops)  # [N, T, S], unmasked
        stop_all = torch.logsumexp(log_q_stop, -1)
        # a terminable prefix stops with the masked proposal's probability (1 at the cap); one
        # that may not stop keeps the unmasked policy's (its flow parameter: see the docstring)
        log_pterm = torch.where(terminable, stop_all - norm, stop_all)
        log_pf = (log_q_all.gather(-1, idx).squeeze(-1) - norm)[:, :-1]
        loss = modified_subtb_loss(log_r, log_pterm, log_pf, lengths, self.subtb_lambda, states)
        if stops.numel() > 1:
            loss = loss + stop_choice_loss(log_q_stop, log_r_stop, terminable)
        return loss, (log_r - log_pterm)[:, 0]

    def _draw_behaviour(
        self, gen: torch.Generator, keys: list[Key], group: int | None
    ) -> tuple[int, float]:
        """(mode, τ_pf): on-policy / replay / tempered with the configured probabilities; replay
        falls back to on-policy when the buffer lacks entries for some prompt/o of the batch."""
        u = float(torch.rand((), generator=gen, device=gen.device))
        edges = (self.probs[0], self.probs[0] + self.probs[1])
        mode = sum(u >= e for e in edges)  # ON_POLICY, REPLAY or TEMPERED
        if mode == REPLAY and not self._can_replay(keys, group):
            mode = ON_POLICY
        if mode != TEMPERED:
            return mode, 1.0
        lo, hi = self.tau_pf
        return mode, lo + (hi - lo) * float(torch.rand((), generator=gen, device=gen.device))

    def _can_replay(self, keys: list[Key], group: int | None) -> bool:
        if self.buffer is None:
            return False
        return all(self.buffer.size(k) > 0 for k in keys[:: group or len(keys)])

    def _replay(
        self, batch: TrainContext, keys: list[Key], n: int, group: int | None
    ) -> tuple[Tensor, Tensor]:
        """n buffered sequences (uniform with replacement), group by group of rows sharing a key."""
        size = group or n
        assert self.buffer is not None
        stopping = batch.task.stopping
        pad = (
            {} if stopping is None else {"width": batch.task.output_len, "pad_id": stopping.pad_id}
        )
        parts = [
            self.buffer.sample(keys[i], size, batch.generator, batch.model.device, **pad)
            for i in range(0, n, size)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # -- protocol ----------------------------------------------------------------------------------
    def extra_modules(self) -> dict[str, nn.Module]:
        return {} if self.log_z is None else {"log_z": self.log_z}

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "log_z": None if self.log_z is None else self.log_z.state_dict(),
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.log_z is not None and state.get("log_z") is not None:
            self.log_z.load_state_dict(state["log_z"])
        if self.buffer is not None and state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.n_updates = int(state.get("n_updates", 0))


# -- helpers ---------------------------------------------------------------------------------------


def _keys(task: Task, cond: Tensor | None, n: int) -> list[Key]:
    """Replay-buffer key of each row: () for the prompt alone, the o tokens on conditional tasks;
    when training draws the prompt from several (``task.train_prompts``), the prompt's ids come
    first (then -1 and the o tokens, if any): the buffer is kept per prompt."""
    prefix: Key = ()
    if len(task.train_prompts) > 1:
        prefix = tuple(int(i) for i in task.prompt_ids.tolist())
    if cond is None:
        return [prefix] * n
    sep: Key = (-1,) if prefix else ()
    return [prefix + sep + tuple(row) for row in cond.tolist()]


@torch.no_grad()
def _cond_features(model: TwistedLM, cond: Tensor | None, n: int) -> Tensor:
    """g(o) [N, d]: the policy's o-encoding (no grad); a [N, 1] placeholder without o."""
    if cond is None:
        return torch.zeros(n, 1, device=model.device)
    encode = getattr(model.policy, "encode_cond", None)
    if encode is None:
        raise ConfigError(
            "method.log_z=conditional needs a policy that encodes o; set "
            "method.policy=separate_conditional (or mlp_head)"
        )
    return encode(cond).float()


@torch.no_grad()
def _log_r(batch: TrainContext, tokens: Tensor, cond: Tensor | None) -> Tensor:
    """Untempered log R = log p₀(s | s₀) + log φ(s[, o]) of given sequences [N, T] → [N]
    (stopping tasks: of each finished z_1:ℓ, p₀ up to and including its stop)."""
    base = batch.model.with_twist(None)
    tokens = tokens.to(batch.model.device)
    task = batch.task
    if task.stopping is not None:
        lp = stopped_sequence_log_probs(
            base, task.prompt_ids, tokens, task.stopping, cond, proposal="p0"
        )["log_p0"]
    else:
        lp = base.sequence_log_probs(task.prompt_ids, tokens, cond, proposal="p0")["log_p0"]
    log_r = lp.sum(1) + task.log_phi(tokens, cond).to(lp.device)
    _check_finite(log_r)
    return log_r


def _lengths(task: Task, tokens: Tensor) -> Tensor | None:
    """Each row's ℓ on a stopping task (None for fixed-length tasks: rows are stored whole)."""
    return None if task.stopping is None else task.stopping.lengths(tokens)


@torch.no_grad()
def _prefix_log_phi(task: Task, tokens: Tensor, terminable: Tensor, cond: Tensor | None) -> Tensor:
    """log φ(z_1:i v) [N, T, S] for every terminable state (n, i) (``terminable`` [N, T]) and
    stop v (0 elsewhere): the potential on the finished sequence "prefix + stop", in one
    ``task.log_phi`` call (it groups the rows by length), or in the potential's own
    ``prefix_log_phi(tokens, terminable, stop_ids)`` when it has one (``task=latent``: from one
    pass per row instead of one per prefix) and returns a value. Refuses φ = 0 (as the TB
    losses)."""
    stopping = task.stopping
    assert stopping is not None
    n, t_len = tokens.shape
    s = len(stopping.stop_ids)
    out = torch.zeros(n, t_len, s, device=tokens.device)
    rows, states = terminable.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return out
    fast = getattr(task.potential, "prefix_log_phi", None) if cond is None else None
    got = None if fast is None else fast(tokens, terminable, list(stopping.stop_ids))
    if got is not None:
        _refuse_zero_reward(got[terminable])
        return got.to(out.device)
    pos = torch.arange(t_len, device=tokens.device)[None]
    i = states[:, None]
    seqs = []
    for v in stopping.stop_ids:
        fill = torch.where(pos == i, v, stopping.pad_id)
        seqs.append(torch.where(pos < i, tokens.index_select(0, rows), fill))
    flat = torch.cat(seqs)  # [S·R, T]: stop by stop
    c = None if cond is None else cond.index_select(0, rows.to(cond.device)).repeat(s, 1)
    log_phi = task.log_phi(flat, c).to(out.device).view(s, -1)
    _refuse_zero_reward(log_phi)
    for k in range(s):
        out[rows, states, k] = log_phi[k]
    return out


def _refuse_zero_reward(log_phi: Tensor) -> None:
    if torch.isneginf(log_phi).any() or torch.isnan(log_phi).any():
        raise UserError(
            "a prefix + stop has log phi = -inf (phi = 0): modified SubTB needs positive rewards "
            "for every terminable prefix; use a potential with a floor (task.epsilon > 0)"
        )


def _check_finite(log_r: Tensor) -> None:
    if torch.isneginf(log_r).any() or torch.isnan(log_r).any():
        raise UserError(
            "a sampled sequence has log R = log p0 + log phi = -inf (phi = 0): trajectory "
            "balance needs positive rewards; use a potential with a floor (task.epsilon > 0)"
        )
