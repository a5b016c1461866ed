"""Stochastic bounds on log Z and KL estimates from exact target samples (paper-spec §7.1).

For each proposal ("twist" → metric prefix ``bounds``, "p0" → prefix ``bounds_p0``; with "p0" the
learned twists still define the intermediate targets and drive resampling), each particle count K
and each of the first ``n_exact`` exact target samples σ^i:

* SIS/IWAE lower bound: logmeanexp of log w over one SIS run (no resampling) with K particles,
  log w = log p₀(s) + log φ(s) − log q(s).
* SIS/IWAE upper bound: logmeanexp of the same K log-weights with particle 1 replaced by σ^i.
* SMC lower bound: log Ẑ of twisted SMC resampling at every step.
* SMC upper bound: log Ẑ of conditional SMC with particle 1 pinned to σ^i (for K = 1 this is
  the weight of σ^i itself, which is what the cSMC recursion gives with a single particle).

The n_exact runs of every kind (SIS, SMC, cSMC) for a K go through the sampler together, as
batched runs with their own resampling thresholds and pins (one call, or chunks of at most
``max_batch_particles`` rows): one prompt pass, one forward per step and one φ call for all
three kinds, not one call per kind or per exact sample.

Each bound is averaged over the n_exact repetitions; ``_se`` keys are standard errors of those
means (sample sd with ddof=1 over √n; NaN when n_exact = 1). A lower bound is below log Z in
expectation and an upper bound above it, so the averages bracket log Z up to noise.

Metric keys (flat; ``{prefix}`` ∈ {bounds, bounds_p0}; ``{b}`` ∈ {lower_sis, upper_sis, lower_smc,
upper_smc}):

=========================================  =========================================================
``{prefix}/k{K}/log_z_{b}`` (+ ``_se``)     mean bound with K particles, for every K in ``particles``
``{prefix}/log_z_{b}`` (+ ``_se``)          the same at the largest K
``bounds/f_q`` (+ ``_se``)                  F_q: mean of log σ̃ − log q over the twisted proposal's
                                            SIS particles at the largest K (all n_exact runs pooled);
                                            the single-sample ELBO, E_q[log σ̃/q] = log Z − KL(q‖σ)
``bounds/g_q`` (+ ``_se``)                  G_q: mean of log σ̃ − log q over the exact samples (all,
                                            or the first ``n_g_q``); E_σ[log σ̃/q] = log Z + KL(σ‖q)
``log_z/estimate``                          log Z used for the KLs: ``log_z_exact`` when given, else
                                            the midpoint of the tighter of the (SMC lower, SMC upper)
                                            and (SIS lower, SIS upper) pairs of the twisted proposal
                                            at the largest K
``log_z/estimate_source``                   "exact", "smc_midpoint" or "sis_midpoint" (a string)
``log_z/exact``                             the exact log Z, only when given
``kl/q_sigma``                              log_z/estimate − bounds/f_q  (estimate of KL(q‖σ))
``kl/sigma_q``                              bounds/g_q − log_z/estimate  (estimate of KL(σ‖q))
=========================================  =========================================================

Stopping tasks (README "Stopping"): the exact samples are finished sequences padded to T, the
SIS/SMC/cSMC runs stop as the task says (finished particles keep their weights, log Ẑ averages
over all particles), and log σ̃ − log q of an exact sample is log p₀(z_1:ℓ) + log φ(z) − log q(z_1:ℓ)
with the masked proposal q (``smclm.smc.sampler.stopped_sequence_log_probs``).

Conditioning (conditional tasks): ``cond`` is None, one row o [c] (or [1, c]) shared by every
exact sample, or one row per exact sample [M, c] (o^i goes with σ^i and is broadcast to all K
particles of the runs for σ^i).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from smclm.errors import ConfigError
from smclm.models.twisted_lm import TwistedLM
from smclm.smc.sampler import SMCResult, log_mean_exp, run_smc, stopped_sequence_log_probs
from smclm.tasks.base import Task

PREFIXES = {"twist": "bounds", "p0": "bounds_p0"}
BOUND_NAMES = ("lower_sis", "upper_sis", "lower_smc", "upper_smc")


def mean_se(values: Tensor | list[float]) -> tuple[float, float]:
    """Mean and standard error (sd with ddof=1 over √n; NaN for n = 1) of 1-D values."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        raise ValueError("mean_se needs at least one value")
    mean = float(x.mean())
    if x.numel() < 2:
        return mean, math.nan
    return mean, float(x.std(unbiased=True) / math.sqrt(x.numel()))


def _cond_rows(cond: Tensor | None, n_samples: int) -> Tensor | None:
    """Normalise cond to one row per exact sample [M, c] (or None)."""
    if cond is None:
        return None
    if cond.dim() == 1:
        cond = cond[None]
    if cond.dim() != 2:
        raise ValueError(f"cond must be [c], [1, c] or [M, c]; got shape {tuple(cond.shape)}")
    if cond.shape[0] == 1:
        return cond.expand(n_samples, -1)
    if cond.shape[0] != n_samples:
        raise ValueError(
            f"cond has {cond.shape[0]} rows but there are {n_samples} exact samples; pass one "
            "shared row or one row per exact sample"
        )
    return cond


@torch.no_grad()
def exact_sample_log_weights(
    model: TwistedLM,
    task: Task,
    samples: Tensor,
    *,
    cond: Tensor | None = None,
    proposal: str = "twist",
    batch_size: int = 1024,
) -> Tensor:
    """log σ̃(s) − log q(s) = log p₀(s) + log φ(s) − log q(s) for sequences samples [M, T]
    (a stopping task: up to each sample's stop, with its masked proposal).

    cond: None or one row per sample [M, c]. Returns float64 [M] on the CPU.
    """
    out = []
    dev = model.device
    stopping = task.stopping
    for i in range(0, samples.shape[0], batch_size):
        chunk = samples[i : i + batch_size].to(dev)
        c = None if cond is None else cond[i : i + batch_size].to(dev)
        if stopping is None:
            lp = model.sequence_log_probs(task.prompt_ids, chunk, c, proposal=proposal)
        else:
            lp = stopped_sequence_log_probs(
                model, task.prompt_ids, chunk, stopping, c, proposal=proposal
            )
        log_phi = task.log_phi(chunk, c).double()
        log_w = lp["log_p0"].double().sum(1) + log_phi - lp["log_q"].double().sum(1)
        out.append(log_w.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _exact_sample_terms(
    model: TwistedLM, task: Task, samples: Tensor, cond: Tensor | None, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Fixed-length tasks: log σ̃ − log q of the exact samples for both proposals from one
    teacher-forced pass and one φ call: {"twist": log p₀ + log φ − log q, "p0": log φ}
    (float64 [M], CPU), equal to :func:`exact_sample_log_weights` for each proposal (up to
    floating-point rounding where :func:`_forced_through_cache` computes them)."""
    twist, p0 = [], []
    dev = model.device
    for i in range(0, samples.shape[0], batch_size):
        chunk = samples[i : i + batch_size].to(dev)
        c = None if cond is None else cond[i : i + batch_size].to(dev)
        forced = _forced_through_cache(model, task, chunk, c)
        if forced is not None:
            log_p0, log_q, log_phi = forced
        else:
            lp = model.sequence_log_probs(task.prompt_ids, chunk, c, proposal="twist")
            log_p0, log_q = lp["log_p0"].double().sum(1), lp["log_q"].double().sum(1)
            log_phi = task.log_phi(chunk, c).double()
        twist.append((log_p0 + log_phi - log_q).cpu())
        # the p₀ proposal (log q = log p₀; with a policy too: "p0" means p₀ itself)
        p0.append(log_phi.cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return {
        "twist": torch.cat(twist) if twist else empty,
        "p0": torch.cat(p0) if p0 else empty,
    }


def _forced_through_cache(
    model: TwistedLM, task: Task, samples: Tensor, cond: Tensor | None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(log p₀(s), log q(s), log φ(s)) [N] float64 of samples [N, T] through the sampler's own
    path (the prompt once, one cached step per token, each sample's tokens forced) when the
    potential reads the KV cache (infilling: log p₀(o | prompt, s) from the cache of
    [prompt, s_1:T−1], one forward of c tokens, instead of a pass over [prompt, s, o_<c]);
    None otherwise (a policy or a tool: the teacher-forced pass)."""
    if model.policy is not None or model.tool is not None or cond is None:
        return None
    if getattr(task.potential, "from_cache", None) is None:
        return None
    n, t_len = samples.shape
    if cond.shape[0] != n:  # one o row for every sample: a row per particle, as the sampler's
        cond = cond.expand(n, -1)
    bound = task.bind(cond)
    ctx, dists = model.start(task.prompt_ids, n, cond)
    log_p0 = torch.zeros(n, dtype=torch.float64, device=samples.device)
    log_q = log_p0.clone()
    for t in range(t_len):
        s_t = samples[:, t : t + 1]
        logits = dists.log_p0 if dists.log_psi is None else dists.log_p0 + dists.log_psi
        log_p0 += dists.log_p0.gather(1, s_t).squeeze(1).double()
        log_q += torch.log_softmax(logits, dim=-1).gather(1, s_t).squeeze(1).double()
        if t < t_len - 1:
            dists = model.advance(ctx, s_t[:, 0])
    log_phi = bound.from_cache(model, ctx, samples)
    if log_phi is None:  # the potential declined (another base model): its own pass
        log_phi = task.log_phi(samples, cond)
    return log_p0, log_q, log_phi.double()


def _chunks(n_runs: int, k: int, max_batch: int, runs_per_call: int | None) -> list[range]:
    """Consecutive runs per sampler call: as many as fit in max(max_batch, K) particles (or
    ``runs_per_call``, when given, within that budget)."""
    per_call = max(1, max_batch // k)
    if runs_per_call is not None:
        per_call = max(1, min(per_call, int(runs_per_call)))
    return [range(i, min(i + per_call, n_runs)) for i in range(0, n_runs, per_call)]


def _batched_runs(
    model: TwistedLM,
    task: Task,
    k: int,
    n_runs: int,
    cond_rows: Tensor | None,
    pinned: Tensor | None,
    max_batch: int,
    runs_per_call: int | None = None,
    ess_threshold: float | list[float] = 1.0,
    **smc_args,
) -> Iterator[tuple[range, SMCResult]]:
    """n_runs independent runs of K particles in batched sampler calls of at most
    max(max_batch, K) particles (``runs_per_call``: at most that many runs per call), run i
    with cond row i (broadcast to its K particles), for conditional SMC exact sample
    ``pinned[i]`` in its slot 0 (a row of −1: run i is not pinned) and resampling threshold
    ``ess_threshold`` (or ``ess_threshold[i]``). Yields (runs, SMCResult) per call."""
    dev = model.device
    for runs in _chunks(n_runs, k, max_batch, runs_per_call):
        c = None
        if cond_rows is not None:
            c = cond_rows[runs.start : runs.stop].repeat_interleave(k, dim=0).to(dev)
        pins = None if pinned is None else pinned[runs.start : runs.stop].to(dev)
        if pins is not None and bool((pins < 0).all()):
            pins = None  # no pinned run in this call
        thresholds = ess_threshold
        if not isinstance(thresholds, (int, float)):
            thresholds = thresholds[runs.start : runs.stop]
        res = run_smc(
            model, task.prompt_ids, task.output_len, task.bind(c), k,
            cond=c, pinned=pins, n_runs=len(runs), ess_threshold=thresholds, **smc_args,
        )  # fmt: skip
        yield runs, res


def _sis_log_weights(
    model: TwistedLM,
    task: Task,
    k: int,
    n_runs: int,
    cond_rows: Tensor | None,
    proposal: str,
    resampling: str,
    generator: torch.Generator,
    max_batch: int,
) -> Tensor:
    """Final log-weights [n_runs, K] (float64, CPU) of n_runs independent SIS runs of K particles.

    Runs are batched into sampler calls of at most max(max_batch, K) particles; run i uses cond
    row i.
    """
    calls = _batched_runs(
        model, task, k, n_runs, cond_rows, None, max_batch,
        proposal=proposal, resampling=resampling, ess_threshold=0.0, generator=generator,
    )  # fmt: skip
    return torch.cat([res.log_w.double().cpu().view(len(runs), k) for runs, res in calls])


def smc_log_z_hats(
    model: TwistedLM,
    task: Task,
    k: int,
    n_runs: int,
    *,
    cond_rows: Tensor | None,
    pinned: Tensor | None,
    proposal: str,
    resampling: str,
    generator: torch.Generator,
    max_batch: int,
    runs_per_call: int | None = None,
    on_chunk=None,
) -> Tensor:
    """log Ẑ [n_runs] (float64, CPU) of n_runs independent SMC runs of K particles resampling
    at every step (pinned [n_runs, T]: conditional SMC, run i around exact sample i), batched
    into sampler calls of at most max(max_batch, K) particles (``runs_per_call=1``: one call
    per run, as before batching)."""
    out = []
    calls = _batched_runs(
        model, task, k, n_runs, cond_rows, pinned, max_batch, runs_per_call,
        proposal=proposal, resampling=resampling, ess_threshold=1.0, generator=generator,
    )  # fmt: skip
    for runs, res in calls:
        out.append(res.log_z_hats.double().cpu())
        if on_chunk is not None:
            on_chunk(len(runs))
    return torch.cat(out)


def _bound_sweep(
    model: TwistedLM,
    task: Task,
    k: int,
    n_runs: int,
    cond_rows: Tensor | None,
    pins: Tensor | None,
    *,
    proposal: str,
    resampling: str,
    generator: torch.Generator,
    max_batch: int,
    on_chunk=None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The SIS, SMC and (``pins`` [n_runs, T], K ≥ 2) conditional SMC runs of the bounds, n_runs
    of each kind, as batched runs of K particles in sampler calls of at most max(max_batch, K)
    particles: run j of a kind uses cond row j (of the first n_runs; cond_rows may hold more,
    one per exact sample) and, for cSMC, pins[j]. Returns the SIS final
    log-weights [n_runs, K] and the SMC and cSMC log Ẑ [n_runs] (float64, CPU; cSMC's None
    when pins is None). The runs go through :func:`_batched_runs`, each kind's n_runs after
    the other's, with their own thresholds and pins."""
    kinds = 2 if pins is None else 3  # runs [0, n) SIS, [n, 2n) SMC, [2n, 3n) cSMC
    pinned = None
    if pins is not None:
        pinned = torch.cat([torch.full((2 * n_runs, pins.shape[1]), -1), pins.cpu()])
    calls = _batched_runs(
        model, task, k, kinds * n_runs,
        None if cond_rows is None else cond_rows[:n_runs].repeat(kinds, 1), pinned, max_batch,
        ess_threshold=[0.0] * n_runs + [1.0] * (kinds - 1) * n_runs,
        proposal=proposal, resampling=resampling, generator=generator,
    )  # fmt: skip
    log_w, log_z = [], []
    for runs, res in calls:
        log_w.append(res.log_w.double().cpu().view(len(runs), k))
        log_z.append(res.log_z_hats.double().cpu())
        if on_chunk is not None:
            on_chunk(len([i for i in runs if i >= n_runs]))  # the SMC and cSMC runs
    hats = torch.cat(log_z)
    csmc = hats[2 * n_runs :] if pins is not None else None
    return torch.cat(log_w)[:n_runs], hats[n_runs : 2 * n_runs], csmc


def _replace_first(log_w: Tensor, value: Tensor) -> Tensor:
    x = log_w.double().cpu().clone()
    x[0] = value
    return x


@torch.no_grad()
def evaluate_bounds(
    model: TwistedLM,
    task: Task,
    exact_samples: Tensor,
    *,
    particles: list[int],
    n_exact: int,
    generator: torch.Generator,
    resampling: str = "multinomial",
    proposals: tuple[str, ...] = ("twist", "p0"),
    log_z_exact: float | None = None,
    n_g_q: int | None = None,
    cond: Tensor | None = None,
    progress: bool = False,
    max_batch_particles: int = 2048,
    smc: bool = True,
    smc_runs_per_call: int | None = None,
) -> dict[str, float | str]:
    """Bounds on log Z for every proposal and K, F_q, G_q, a log Z estimate and the two KLs.

    See the module docstring for the protocol and the metric keys. ``max_batch_particles``: the
    most particles (rows) per sampler call: the n_exact independent SIS runs, SMC runs and
    conditional SMC runs of a K are batched together into as few calls as fit (a single run of K
    particles when K alone exceeds it), which bounds the memory (KV caches, [rows, V] logits).
    ``smc_runs_per_call=1`` runs the SMC/cSMC bounds one exact sample at a time and each kind
    in its own calls (the loop before batching; for benchmarks and tests). ``smc=False`` skips
    the SMC/cSMC bounds (a learned policy without twists: SMC with ψ ≡ 1 would resample towards
    p₀, not towards σ).
    """
    names = BOUND_NAMES if smc else ("lower_sis", "upper_sis")
    ks = sorted({int(k) for k in particles})
    if not ks or ks[0] < 1:
        raise ValueError(f"particles must be a non-empty list of positive ints, got {particles}")
    unknown = [p for p in proposals if p not in PREFIXES]
    if unknown:
        raise ValueError(f"unknown proposal(s) {unknown}; choose from {sorted(PREFIXES)}")
    if "twist" not in proposals:
        raise ValueError("proposals must include 'twist' (F_q, G_q and the KLs are of q^twist)")
    if exact_samples.dim() != 2 or exact_samples.shape[1] != task.output_len:
        raise ValueError(
            f"exact_samples must be [M, T={task.output_len}], got {tuple(exact_samples.shape)}"
        )
    m = exact_samples.shape[0]
    if not 1 <= n_exact <= m:
        raise ValueError(f"n_exact must be between 1 and the {m} exact samples, got {n_exact}")
    n_g = m if n_g_q is None else min(int(n_g_q), m)
    if n_g < 1:
        raise ValueError(f"n_g_q must be positive, got {n_g_q}")
    cond_rows = _cond_rows(cond, m)
    metrics: dict[str, float | str] = {}
    f_q_values: Tensor | None = None
    if max_batch_particles < 1:
        raise ConfigError(
            f"evaluator.max_batch_particles={max_batch_particles} must be a positive number of "
            "particles per sampler call (e.g. 2048)"
        )
    bar = tqdm(
        total=len(proposals) * len(ks) * (2 * n_exact if smc else 1),
        desc="log Z bounds",
        disable=not progress,
        leave=False,
    )
    pins = exact_samples[:n_exact]
    # log w of the exact samples under each proposal (independent of K). Fixed-length tasks: one
    # teacher-forced pass and one φ call over the first max(n_exact, n_g) samples serve every
    # proposal and G_q (with the p₀ proposal, log w = log φ); stopping tasks mask the proposal
    # up to each sample's stop, one pass per proposal.
    n_tf = max(n_exact, n_g)
    shared = None
    if task.stopping is None:
        shared = _exact_sample_terms(
            model, task, exact_samples[:n_tf], None if cond_rows is None else cond_rows[:n_tf]
        )
    for proposal in proposals:
        prefix = PREFIXES[proposal]
        if shared is not None:
            sigma_log_w = shared[proposal][:n_exact]
        else:
            sigma_log_w = exact_sample_log_weights(
                model,
                task,
                pins,
                cond=None if cond_rows is None else cond_rows[:n_exact],
                proposal=proposal,
            )
        for k in ks:
            per_bound: dict[str, list[float]] = {}
            merged = None
            if smc and smc_runs_per_call is None:
                # The n_exact SIS, SMC and cSMC runs of this K together, in batched calls.
                merged = _bound_sweep(
                    model, task, k, n_exact, cond_rows, pins if k > 1 else None,
                    proposal=proposal, resampling=resampling, generator=generator,
                    max_batch=max_batch_particles, on_chunk=bar.update,
                )  # fmt: skip
                sis_log_w = merged[0]
            else:  # the SIS runs (and below the SMC and cSMC runs), each kind in its own calls
                sis_log_w = _sis_log_weights(
                    model,
                    task,
                    k,
                    n_exact,
                    cond_rows,
                    proposal,
                    resampling,
                    generator,
                    max_batch_particles,
                )  # [n_exact, K]
            if not smc:
                bar.update(1)
            per_bound["lower_sis"] = [log_mean_exp(sis_log_w[i]) for i in range(n_exact)]
            per_bound["upper_sis"] = [
                log_mean_exp(_replace_first(sis_log_w[i], sigma_log_w[i])) for i in range(n_exact)
            ]
            if merged is not None:
                lower, upper = merged[1], merged[2]
                assert lower is not None
                if upper is None:  # K = 1: cSMC's Ẑ is the pinned sample's own weight
                    upper = sigma_log_w.double()
                    bar.update(n_exact)
                per_bound["lower_smc"] = lower.tolist()
                per_bound["upper_smc"] = upper.tolist()
            elif smc:
                smc_args: dict = dict(
                    cond_rows=cond_rows,
                    proposal=proposal,
                    resampling=resampling,
                    generator=generator,
                    max_batch=max_batch_particles,
                    runs_per_call=smc_runs_per_call,
                    on_chunk=bar.update,
                )
                lower = smc_log_z_hats(model, task, k, n_exact, pinned=None, **smc_args)
                per_bound["lower_smc"] = lower.tolist()
                if k == 1:  # cSMC with one particle: Ẑ is the pinned sample's own weight
                    upper = sigma_log_w.double()
                    bar.update(n_exact)
                else:
                    upper = smc_log_z_hats(model, task, k, n_exact, pinned=pins, **smc_args)
                per_bound["upper_smc"] = upper.tolist()
            for b, vals in per_bound.items():
                mean, se = mean_se(vals)
                metrics[f"{prefix}/k{k}/log_z_{b}"] = mean
                metrics[f"{prefix}/k{k}/log_z_{b}_se"] = se
            if proposal == "twist" and k == ks[-1]:
                f_q_values = sis_log_w.reshape(-1)
        for b in names:
            for suffix in ("", "_se"):
                metrics[f"{prefix}/log_z_{b}{suffix}"] = metrics[
                    f"{prefix}/k{ks[-1]}/log_z_{b}{suffix}"
                ]
    bar.close()

    assert f_q_values is not None
    f_q, f_q_se = mean_se(f_q_values)
    if shared is not None:
        g_values = shared["twist"][:n_g]
    else:
        g_values = exact_sample_log_weights(
            model,
            task,
            exact_samples[:n_g],
            cond=None if cond_rows is None else cond_rows[:n_g],
            proposal="twist",
        )
    g_q, g_q_se = mean_se(g_values)
    metrics["bounds/f_q"], metrics["bounds/f_q_se"] = f_q, f_q_se
    metrics["bounds/g_q"], metrics["bounds/g_q_se"] = g_q, g_q_se

    if log_z_exact is not None:
        log_z, source = float(log_z_exact), "exact"
        metrics["log_z/exact"] = log_z
    else:
        log_z, source = log_z_midpoint(metrics)
    metrics["log_z/estimate"] = log_z
    metrics["log_z/estimate_source"] = source
    metrics["kl/q_sigma"] = log_z - f_q
    metrics["kl/sigma_q"] = g_q - log_z
    return metrics


def log_z_midpoint(metrics: dict, prefix: str = "bounds") -> tuple[float, str]:
    """The reference's "best midpoint": the midpoint of the tighter of the SMC and SIS pairs.

    Uses the largest-K keys ``{prefix}/log_z_{lower,upper}_{sis,smc}``. Ties go to SIS, as in
    the reference (SMC is chosen only when its gap is strictly smaller).
    """
    lo_sis, up_sis = metrics[f"{prefix}/log_z_lower_sis"], metrics[f"{prefix}/log_z_upper_sis"]
    if f"{prefix}/log_z_lower_smc" not in metrics:  # no SMC bounds (a policy without twists)
        return 0.5 * (lo_sis + up_sis), "sis_midpoint"
    lo_smc, up_smc = metrics[f"{prefix}/log_z_lower_smc"], metrics[f"{prefix}/log_z_upper_smc"]
    if up_smc - lo_smc < up_sis - lo_sis:
        return 0.5 * (lo_smc + up_smc), "smc_midpoint"
    return 0.5 * (lo_sis + up_sis), "sis_midpoint"
