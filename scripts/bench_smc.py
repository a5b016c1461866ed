"""Benchmark: cost of our KV-cached twisted SMC against plain sampling and against recomputation.

For each model (the toy world and a TinyStories-33M-shaped, randomly initialised GPT-Neo) with N
particles, a ~8-token prompt, an MLP twist head on the frozen base and a cheap count potential:

(a) ``smc_overhead``         = our SMC (``run_smc``: multinomial resampling at every step,
                               twisted proposal) at T_short / plain KV-cached batched sampling
                               from the same twisted proposal at T_short (no weights, no
                               resampling).                                       target <= 1.10
(b) ``speedup_vs_recompute`` = an SMC that re-runs the base model (and head) over the whole
                               prefix [prompt, s_1..s_{t-1}] at every step, without a cache (the
                               reference code's algorithm; same weight/resampling math), at
                               T_short / ours at T_short.                         target >= 5
(c) ``length_scaling``       = ours at T_long / ours at T_short (T_long = 4 T_short).
                               target <= 4.5, or <= 1.1 x ``plain_length_scaling`` (plain
                               sampling's own T_long / T_short, reported beside it) where that
                               is above 4.5 (attention over the prefix grows with t for both).
(d) ``kv_reorder_overhead``  = (ours at T_short − ours with the KV-cache reorder made a no-op,
                               an invalid sampler timed only for this) / plain at T_short: the
                               part of (a)'s overhead that is the cache row copies after each
                               resample (the minimum data movement: only rows whose ancestor
                               changed, only the positions after the shared prompt). reported

Sections (``--sections``; each runs for the models it applies to, ``--models``):

* ``core`` (toy, tinystories): (a)-(c) above.
* ``grouped`` (every model): batched SMC runs against one run after another.
  ``grouped_train_speedup`` = one cSMC sampling sweep of the paper's infilling CTL layout
  (25 o x 4 particles, T = 15, c = 10, resampling every step, one exact sample pinned per o) as
  25 sequential runs (the G = 1 path called 25 times) / as one batched call. target >= 3.
  ``grouped_eval_speedup`` = ``evaluate_bounds`` at K = 32 over 20 exact samples (both
  proposals, same T and c) with the SMC/cSMC bounds one exact sample at a time and each kind
  in its own calls (``smc_runs_per_call=1``, the loop before batching) / batched (the SIS, SMC
  and cSMC runs of a K in one call).                                            target >= 3.
  The potential is infilling's log p0(o | prompt, s); prompt, o's and s's are random tokens.
  ``--grouped auto`` (default) times both parts for the toy and the train part for the large
  models: the eval part of tinystories took 65 minutes at a load of 7-13 on 2 cores (pass
  ``--grouped train,eval`` to run it).
* ``real`` (smollm2, ``--dtype``): ``smc_overhead`` at N = 64, T = 32 (``--real-n``, ``--real-t``)
  and ``vs_hf_generate`` = transformers' ``generate(do_sample=True, max_new_tokens=32)`` of 64
  sequences from p0 (top-k/top-p off) / our plain KV-cached sampling from p0.   reported
* ``eval`` (smollm2): ``eval_over_update`` = one bounds evaluation / one CTL update of
  ``smclm train experiment=infilling_2 model=smollm2`` at ``--eval-overrides`` (default
  ``evaluator.particles=[32] evaluator.n_exact=4``: the paper's smaller K and n_exact; K = 500 is
  out of reach of a 2-core CPU), medians of the run's own ``time/eval_s`` and ``time/update_s``
  (the first update left out).                                                    target <= 3
  ``update_s`` and ``eval_s``: those two medians in seconds (reported, no target). The run uses
  ``model.dtype=<--dtype>`` (its ``model.dtype_resolved`` is reported) and the experiment's
  twist (``separate_mlp``) unless ``--eval-overrides`` names another (``twist=mlp``: an MLP head
  on the frozen body).

After one (short) warm-up run of each sampler, the timed runs go round-robin: each round times
ours and plain at T_short (``--repeats`` rounds) and, in the first ``--long-repeats`` rounds,
ours at T_long and the recompute baseline at T_short. Defaults: 5 rounds of everything for the
toy (a run takes 0.1-2 s); one round for tinystories, whose runs take 0.5-2.5 minutes each on 2
CPU cores (a step is ~1 s, so a single run already averages over 32-128 steps; pass --repeats 2
for a second ours/plain pair, +1 minute). The default bench takes about 6 minutes on 2 cores.
Each reported ratio is the ratio of the medians; the JSON also holds every raw time and, under
``paired_ratios``, the median over rounds of the ratio of two runs from the same round (less
sensitive to slow drift of the load on a shared machine, more to a single slow run).

The recompute baseline computes the vocabulary projections (lm_head and the twist's output layer)
at the last position only (``--recompute-logits last``, the default): that is the cheapest
cache-free variant and so a conservative baseline for (b). ``--recompute-logits all`` computes
them at every position as a plain full forward of ``AutoModelForCausalLM`` (and of the head over
all hidden states) does, which is what the reference code does before slicing the last step.

Usage:
    .venv/bin/python scripts/bench_smc.py [--models toy,tinystories,smollm2]
        [--sections core,grouped,real,eval] [--n 256] [--repeats 5] [--threads 1] [--quick]
        [--out bench.json] [--md bench.md]

``--md`` writes the table as Markdown headed by the command line, the date, the machine and the
1-minute load average before and after the run (``docs/results/bench_*.md`` are such files).

Threads: the toy model runs single-threaded by default (``--threads``): its ops are so small that
a second thread only adds hand-off latency, which on a shared 2-core machine turns into
seconds-long stalls; the TinyStories-shaped model uses torch's default. Every sampler of a model
runs with the same setting.

``--dtype auto`` (the default) uses bfloat16 for the TinyStories-shaped model on CUDA or on a CPU
with native bfloat16 matrix units (AVX512-BF16 / AMX), and float32 on other CPUs, where bfloat16
matrix products are emulated and several times slower than float32 (a single N=256 run at T=128
would take tens of minutes); pass ``--dtype bfloat16`` to force it. For SmolLM2 ``auto`` is
smclm's own ``model.dtype=auto`` (on a CPU: bfloat16 only with native bf16, and only if log p0
and log q agree with float32 on a probe; a line says which and why). The toy model is float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smclm.models.loading import build_twist, cast_floating, cpu_has_bf16  # noqa: E402
from smclm.models.twisted_lm import TwistedLM  # noqa: E402
from smclm.smc.resampling import arrange_in_place, get_resampler  # noqa: E402
from smclm.smc.sampler import ParticleCollapseError, ess, run_smc, sample_categorical  # noqa: E402

TARGETS = {
    "smc_overhead": ("<=", 1.10),
    "speedup_vs_recompute": (">=", 5.0),
    "length_scaling": ("<=", 4.5),  # or <= 1.1 x plain_length_scaling (see passes)
    "grouped_train_speedup": (">=", 3.0),
    "grouped_eval_speedup": (">=", 3.0),
    "eval_over_update": ("<=", 3.0),
}
SEED = 1234
PROMPT_LEN = 8


# -- models ----------------------------------------------------------------------------------------
def build_toy(max_positions: int) -> nn.Module:
    """The toy world's GPT-Neo (vocab 12, hidden 32, 2 layers), or an equivalent if unavailable."""
    try:
        from smclm.models.toy import build_toy_world

        model, _ = build_toy_world(max_positions=max_positions)
        return model
    except Exception as e:  # the toy module may be mid-edit; the shape is what matters here
        print(f"[bench] smclm.models.toy unusable ({type(e).__name__}: {e}); using a local toy")
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        cfg = GPTNeoConfig(
            vocab_size=12, hidden_size=32, num_layers=2, num_heads=4,
            attention_types=[[["global"], 2]], max_position_embeddings=max_positions,
            window_size=max_positions, intermediate_size=128, embed_dropout=0.0,
            attention_dropout=0.0, resid_dropout=0.0, bos_token_id=None, eos_token_id=11,
            pad_token_id=11,
        )  # fmt: skip
        torch.manual_seed(SEED)
        return GPTNeoForCausalLM(cfg).eval()


def build_tinystories_shaped() -> nn.Module:
    """A randomly initialised GPT-Neo with the shape of roneneldan/TinyStories-33M."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(
        vocab_size=50257, hidden_size=768, num_layers=4, num_heads=16,
        attention_types=[[["global", "local"], 2]], window_size=256,
        max_position_embeddings=2048, intermediate_size=None, embed_dropout=0.0,
        attention_dropout=0.0, resid_dropout=0.0, bos_token_id=50256, eos_token_id=50256,
    )  # fmt: skip
    torch.manual_seed(SEED)
    return GPTNeoForCausalLM(cfg).eval()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The TinyStories-shaped model's dtype (random weights: no agreement probe to run)."""
    if name == "auto":
        fast_bf16 = device.type == "cuda" or cpu_has_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


_AUTO: dict[str, tuple[torch.dtype, str]] = {}


def build_smollm2(dtype_name: str = "float32") -> nn.Module:
    """SmolLM2-135M-Instruct through the project's loader (``model=smollm2``: the packaged GGUF,
    dequantised once and cached), in float32; with ``auto`` on a CPU the library's rule
    (``smclm.models.loading.auto_cpu_dtype``, as ``smclm train model.dtype=auto``) decides,
    once per process, and may cast it to bfloat16."""
    from smclm.models.loading import auto_cpu_dtype, load_base_model

    base, tok = load_base_model("smollm2")
    if dtype_name == "auto":
        _AUTO["smollm2"] = dtype, why = auto_cpu_dtype(base, tok)
        print(f"[bench] smollm2 model.dtype=auto: {str(dtype)[6:]} ({why})", flush=True)
    return base


_BASES: dict[str, nn.Module] = {}


def make_lm(
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    conditional: bool = False,
) -> TwistedLM:
    """The model with an MLP twist head on the frozen base (conditional: the head also reads
    the o encoding). Bases are built once per process."""
    if name == "toy":
        key = f"toy{max_positions}"
        if key not in _BASES:
            _BASES[key] = build_toy(max_positions)
        base, dtype = _BASES[key], torch.float32
    elif name in ("tinystories", "smollm2"):
        if name not in _BASES:
            _BASES[name] = build_tinystories_shaped() if name == "tinystories" else build_smollm2()
        base = _BASES[name]
    else:
        raise SystemExit(f"unknown model '{name}'; choose toy, tinystories or smollm2")
    # floating non-persistent buffers (Llama's rotary inv_freq) stay float32, as smclm loads them
    base = cast_floating(base.to(device=device), dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(SEED)  # the head's hidden layers are drawn from the global RNG
    twist = build_twist("head", base, head="mlp", dtype=dtype, conditional=conditional)
    # The head's output layer starts at zero (log psi = 0, q = p0); give it small random weights
    # so that the twist, the weights and the resampling are not degenerate. Timing-neutral.
    gen = torch.Generator().manual_seed(SEED)
    out = twist.head.net[-1]
    w = torch.randn(out.weight.shape, generator=gen) * (0.5 / out.in_features**0.5)
    out.weight.data.copy_(w.to(out.weight))
    return TwistedLM(base, twist.eval())


def count_potential(vocab_size: int) -> Callable[[Tensor], Tensor]:
    """log phi(s) = -0.1 * #{t : s_t < V/4}: a cheap, strictly positive potential."""
    cutoff = max(1, vocab_size // 4)

    def log_phi(tokens: Tensor) -> Tensor:
        return -0.1 * (tokens < cutoff).sum(-1).float()

    return log_phi


# -- the three samplers ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def ours(lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int) -> Tensor:
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    res = run_smc(
        lm, prompt, t_len, log_phi, n, proposal="twist", resampling="multinomial",
        ess_threshold=1.0, generator=gen,
    )  # fmt: skip
    return res.tokens


@torch.no_grad()
def plain(lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int) -> Tensor:
    """KV-cached batched sampling from q ∝ p0·psi: no weights, no resampling."""
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    ctx, dists = lm.start(prompt, n)
    out = []
    for t in range(t_len):
        s = sample_categorical(F.log_softmax(dists.log_p0 + dists.log_psi, dim=-1), gen)
        out.append(s)
        if t + 1 < t_len:
            dists = lm.advance(ctx, s)
    return torch.stack(out, dim=1)


@torch.no_grad()
def ours_without_kv_reorder(
    lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int
) -> Tensor:
    """``ours`` with the KV-cache reorder after each resample made a no-op: NOT a valid sampler
    (the caches keep the old rows), timed only to split our overhead into the cache row copies
    and the rest of the per-step work (``kv_reorder_overhead``)."""
    lm.reorder = lambda ctx, ancestors: None  # an instance attribute shadows the method
    try:
        return ours(lm, prompt, t_len, log_phi, n, seed)
    finally:
        del lm.reorder


def make_recompute(all_logits: bool):
    @torch.no_grad()
    def recompute(lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int) -> Tensor:
        """The reference algorithm: a cache-free forward over the whole prefix at every step.

        Same proposal, incremental weights, log Z estimate and multinomial resampling (every
        step before the last) as ``smclm.smc.sampler.step``.
        """
        gen = torch.Generator(device=prompt.device).manual_seed(seed)
        dev = prompt.device
        lm_head, head = lm.base.get_output_embeddings(), lm.twist.head
        prompt_rows = prompt[None].expand(n, -1)
        tokens = torch.zeros(n, 0, dtype=torch.long, device=dev)
        log_w, log_gamma, log_p0, log_q = (torch.zeros(n, device=dev) for _ in range(4))
        log_z = torch.zeros((), device=dev)
        resample = get_resampler("multinomial")
        for t in range(1, t_len + 1):
            ids = torch.cat([prompt_rows, tokens], dim=1)
            h = lm.body(input_ids=ids, use_cache=False).last_hidden_state
            if all_logits:  # as a plain full forward of the LM and of the head computes them
                lp = F.log_softmax(lm_head(h).float(), dim=-1)[:, -1]
                lpsi = head(h)[:, -1]
            else:
                lp = F.log_softmax(lm_head(h[:, -1]).float(), dim=-1)
                lpsi = head(h[:, -1])
            log_q_all = F.log_softmax(lp + lpsi, dim=-1)
            s_t = sample_categorical(log_q_all, gen)
            idx = s_t[:, None]
            log_q_t = log_q_all.gather(1, idx).squeeze(1)
            log_p0 = log_p0 + lp.gather(1, idx).squeeze(1)
            tokens = torch.cat([tokens, idx], dim=1)
            if t < t_len:
                log_twist = lpsi.gather(1, idx).squeeze(1)
            else:
                log_twist = log_phi(tokens).float()
            new_log_gamma = log_p0 + log_twist
            new_log_w = log_w + new_log_gamma - log_gamma - log_q_t
            if torch.isneginf(new_log_w).all():
                raise ParticleCollapseError(t, n)
            log_z = log_z + torch.logsumexp(new_log_w, 0) - torch.logsumexp(log_w, 0)
            log_w, log_gamma, log_q = new_log_w, new_log_gamma, log_q + log_q_t
            ess(log_w)  # the sampler computes it every step as well
            if t < t_len:
                anc = arrange_in_place(resample(log_w, n, gen), n)
                tokens, log_gamma, log_p0, log_q = (x[anc] for x in (tokens, log_gamma, log_p0,
                                                                      log_q))  # fmt: skip
                log_w = torch.zeros_like(log_w)
        return tokens

    return recompute


# -- timing ----------------------------------------------------------------------------------------
def timed(fn, device: torch.device, *args) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(*args)
    sync(device)
    return time.perf_counter() - t0


def bench_core(name: str, args, device: torch.device) -> dict:
    dtype = model_dtype(name, args, device)
    t_short, t_long, n = args.t_short, args.t_long, args.n
    lm = make_lm(name, dtype, device, max_positions=max(256, PROMPT_LEN + t_long + 8))
    v = lm.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, v, (PROMPT_LEN,), generator=gen).to(device)
    log_phi = count_potential(v)
    recompute = make_recompute(args.recompute_logits == "all")
    run = {
        "ours": ours,
        "plain": plain,
        "recompute": recompute,
        "noreorder": ours_without_kv_reorder,
    }
    small = name == "toy"
    reps = args.repeats or (5 if small and not args.quick else 1)
    long_reps = args.long_repeats or (reps if small else 1)
    threads = args.threads or (1 if small else torch.get_num_threads())
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {
        "ours_T": [], "plain_T": [], "ours_4T": [], "plain_4T": [], "recompute_T": [],
        "ours_no_kv_reorder_T": [],
    }  # fmt: skip

    def one(kind: str, t_len: int, seed: int) -> float:
        return timed(run[kind], device, lm, prompt, t_len, log_phi, n, seed)

    # Warm-up (excluded): one short run of each sampler (same N and shapes: first-call
    # allocations, kernel selection, CUDA context; T_short/4 steps for the toy, 2 for the large
    # model, whose steps take about a second each). Then round-robin repeats, so that drift on
    # a shared machine hits every measurement alike.
    t_warm = max(2, t_short // 4) if small else 2
    for kind in run:
        one(kind, t_warm, SEED)
    for r in range(max(reps, long_reps)):
        seed = SEED + 1 + r
        if r < reps:
            times["ours_T"].append(one("ours", t_short, seed))
            times["plain_T"].append(one("plain", t_short, seed))
        if r < long_reps:
            times["ours_4T"].append(one("ours", t_long, seed))
            times["plain_4T"].append(one("plain", t_long, seed))
            times["recompute_T"].append(one("recompute", t_short, seed))
            times["ours_no_kv_reorder_T"].append(one("noreorder", t_short, seed))
        if args.verbose:
            print(
                f"[bench] {name} round {r}: "
                + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items() if len(v) > r),
                flush=True,
            )
    torch.set_num_threads(default_threads)
    med = {k: statistics.median(x) for k, x in times.items()}
    ours_t = times["ours_T"]

    def paired(num: list[float], den: list[float]) -> float:
        """Median over rounds of num/den measured in the same round (robust to slow drift)."""
        return statistics.median(a / b for a, b in zip(num, den))

    return {
        "smc_overhead": med["ours_T"] / med["plain_T"],
        "speedup_vs_recompute": med["recompute_T"] / med["ours_T"],
        "length_scaling": med["ours_4T"] / med["ours_T"],
        "plain_length_scaling": med["plain_4T"] / med["plain_T"],
        "kv_reorder_overhead": (med["ours_T"] - med["ours_no_kv_reorder_T"]) / med["plain_T"],
        "paired_ratios": {
            "smc_overhead": paired(ours_t, times["plain_T"]),
            "speedup_vs_recompute": paired(times["recompute_T"], ours_t),
            "length_scaling": paired(times["ours_4T"], ours_t),
            "plain_length_scaling": paired(times["plain_4T"], times["plain_T"]),
        },
        "seconds_median": med,
        "seconds_all": times,
        "config": {
            "n_particles": n,
            "t_short": t_short,
            "t_long": t_long,
            "prompt_len": PROMPT_LEN,
            "vocab_size": v,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "repeats": reps,
            "long_repeats": long_reps,
            "recompute_logits": args.recompute_logits,
            "threads": threads,
            "torch": torch.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
    }


# -- batched runs (grouped_*), the real model (smc_overhead, vs_hf_generate), eval/update --------
GROUPS, PER_GROUP, T_GROUP, C_GROUP = 25, 4, 15, 10  # the paper's infilling CTL layout
EVAL_K, EVAL_EXACT = 32, 20


def _infilling_setup(name: str, dtype: torch.dtype, device: torch.device, t_len: int, c: int):
    """A conditional MLP twist and the infilling potential log p0(o | prompt, s) (read from the
    sampler's KV cache at the last step), T = 15, c = 10; random prompt, o's and "exact" s (the
    timings do not depend on what the tokens are)."""
    from smclm.tasks.base import Task
    from smclm.tasks.infilling import InfillingPotential

    lm = make_lm(name, dtype, device, max_positions=256, conditional=True)
    v = lm.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, v, (PROMPT_LEN,), generator=gen).to(device)
    task = Task("infilling", prompt, t_len, InfillingPotential(lm.base, prompt), None, cond_len=c)
    o = torch.randint(0, v, (max(GROUPS, EVAL_EXACT), c), generator=gen).to(device)
    s = torch.randint(0, v, (max(GROUPS, EVAL_EXACT), t_len), generator=gen).to(device)
    return lm, task, o, s


@torch.no_grad()
def train_sweep(lm, task, o, pins, seed: int, looped: bool) -> None:
    """One cSMC sampling sweep of 25 o x 4 particles (resampling every step, one exact sample
    pinned per o): one batched call, or (looped) the G = 1 path called once per o."""
    gen = torch.Generator(device=o.device).manual_seed(seed)
    args = dict(resampling="multinomial", ess_threshold=1.0, generator=gen)
    g = o.shape[0]
    if looped:
        for i in range(g):
            c = o[i : i + 1].expand(PER_GROUP, -1)
            run_smc(lm, task.prompt_ids, task.output_len, task.bind(c), PER_GROUP, cond=c,
                    pinned=pins[i], **args)  # fmt: skip
    else:
        c = o.repeat_interleave(PER_GROUP, dim=0)
        run_smc(lm, task.prompt_ids, task.output_len, task.bind(c), PER_GROUP, cond=c, pinned=pins,
                n_runs=g, **args)  # fmt: skip


@torch.no_grad()
def eval_bounds(lm, task, s, o, seed: int, looped: bool) -> None:
    """evaluate_bounds at K = 32 over 20 exact samples, both proposals: the SMC/cSMC bounds in
    one batched call per K and proposal, or (looped) one call per exact sample (as before)."""
    from smclm.evaluators.bounds import evaluate_bounds

    gen = torch.Generator(device=s.device).manual_seed(seed)
    evaluate_bounds(lm, task, s, particles=[EVAL_K], n_exact=s.shape[0], generator=gen, cond=o,
                    smc_runs_per_call=1 if looped else None)  # fmt: skip


def bench_grouped(name: str, args, device: torch.device) -> dict:
    dtype = model_dtype(name, args, device)
    # --quick: a smoke run of the same code (5 o, 4 exact samples, T = 4, c = 2)
    t_len, c, n_o, n_ex = (4, 2, 5, 4) if args.quick else (T_GROUP, C_GROUP, GROUPS, EVAL_EXACT)
    lm, task, o, s = _infilling_setup(name, dtype, device, t_len, c)
    small = name == "toy"
    reps = args.repeats or (3 if small else 1)
    threads = args.threads or (1 if small else torch.get_num_threads())
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    o_t, pins = o[:n_o], s[:n_o]
    o_e, s_e = o[:n_ex], s[:n_ex]
    spec = args.grouped if args.grouped != "auto" else ("train,eval" if small else "train")
    parts = [x.strip() for x in spec.split(",") if x.strip()]
    # Warm-up (excluded): a small batched and looped sweep and bounds over 2 samples.
    if "train" in parts:
        train_sweep(lm, task, o_t[:2], pins[:2], SEED, looped=False)
        train_sweep(lm, task, o_t[:2], pins[:2], SEED, looped=True)
    if "eval" in parts:
        eval_bounds(lm, task, s_e[:2], o_e[:2], SEED, looped=False)
    names = [f"{p}_{w}" for p in ("train", "eval") if p in parts for w in ("looped", "batched")]
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        seed = SEED + 1 + r
        if "train" in parts:
            times["train_looped"].append(
                timed(train_sweep, device, lm, task, o_t, pins, seed, True)
            )
            times["train_batched"].append(
                timed(train_sweep, device, lm, task, o_t, pins, seed, False)
            )
        if "eval" in parts:
            times["eval_looped"].append(timed(eval_bounds, device, lm, task, s_e, o_e, seed, True))
            times["eval_batched"].append(
                timed(eval_bounds, device, lm, task, s_e, o_e, seed, False)
            )
        if args.verbose:
            print(f"[bench] {name} grouped round {r}: "
                  + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()), flush=True)  # fmt: skip
    torch.set_num_threads(default_threads)
    med = {k: statistics.median(x) for k, x in times.items()}
    out = {}
    if "train" in parts:
        out["grouped_train_speedup"] = med["train_looped"] / med["train_batched"]
    if "eval" in parts:
        out["grouped_eval_speedup"] = med["eval_looped"] / med["eval_batched"]
    return {
        **out,
        "seconds_median": med,
        "seconds_all": times,
        "config": {
            "train": f"cSMC sweep, {n_o} o x {PER_GROUP} particles, T={t_len}, c={c}",
            "eval": f"evaluate_bounds K={EVAL_K}, {n_ex} exact samples, proposals twist+p0, "
            f"T={t_len}, c={c}",
            "dtype": str(dtype).replace("torch.", ""),
            "threads": threads,
            "repeats": reps,
        },
    }


@torch.no_grad()
def plain_p0(lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int) -> Tensor:
    """KV-cached batched sampling from p0 (no head): what HF generate does."""
    return plain_from(lm.with_twist(None), prompt, t_len, n, seed)


@torch.no_grad()
def plain_from(lm: TwistedLM, prompt: Tensor, t_len: int, n: int, seed: int) -> Tensor:
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    ctx, dists = lm.start(prompt, n)
    out = []
    for t in range(t_len):
        logits = dists.log_p0 if dists.log_psi is None else dists.log_p0 + dists.log_psi
        s = sample_categorical(F.log_softmax(logits, dim=-1), gen)
        out.append(s)
        if t + 1 < t_len:
            dists = lm.advance(ctx, s)
    return torch.stack(out, dim=1)


@torch.no_grad()
def hf_generate(lm: TwistedLM, prompt: Tensor, t_len: int, log_phi, n: int, seed: int) -> Tensor:
    """transformers' generate(do_sample=True, max_new_tokens=T) for n copies of the prompt, from
    p0 itself (no top-k/top-p, temperature 1, exactly T new tokens)."""
    torch.manual_seed(seed)
    ids = prompt[None].expand(n, -1)
    eos = lm.base.config.eos_token_id
    out = lm.base.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=t_len,
        min_new_tokens=t_len, top_k=0, top_p=1.0, temperature=1.0,
        pad_token_id=eos if isinstance(eos, int) else 0,
    )  # fmt: skip
    return out[:, prompt.numel() :]


def bench_real(name: str, args, device: torch.device) -> dict:
    """Issue 11's real-model ratios: N = 64, T = 32 (in ``--dtype``; see model_dtype)."""
    dtype = model_dtype(name, args, device)
    n, t_len = args.real_n, args.real_t
    lm = make_lm(name, dtype, device, max_positions=256)
    v = lm.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, v, (PROMPT_LEN,), generator=gen).to(device)
    log_phi = count_potential(v)
    run = {"ours": ours, "plain": plain, "plain_p0": plain_p0, "hf_generate": hf_generate}
    reps = args.repeats or 2
    for fn in run.values():  # warm-up
        fn(lm, prompt, 2, log_phi, n, SEED)
    times: dict[str, list[float]] = {k: [] for k in run}
    for r in range(reps):
        for kind, fn in run.items():
            times[kind].append(timed(fn, device, lm, prompt, t_len, log_phi, n, SEED + 1 + r))
        if args.verbose:
            print(f"[bench] {name} real round {r}: "
                  + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in times.items()), flush=True)  # fmt: skip
    med = {k: statistics.median(x) for k, x in times.items()}
    return {
        "smc_overhead": med["ours"] / med["plain"],
        "vs_hf_generate": med["hf_generate"] / med["plain_p0"],
        "seconds_median": med,
        "seconds_all": times,
        "config": {
            "n_particles": n,
            "t": t_len,
            "dtype": str(dtype).replace("torch.", ""),
            "repeats": reps,
            "threads": torch.get_num_threads(),
        },  # fmt: skip
    }


def bench_eval_over_update(name: str, args, device: torch.device) -> dict:
    """One bounds evaluation / one CTL update of ``smclm train experiment=infilling_2`` on the
    model, at the evaluation settings ``--eval-overrides`` (the paper's K = 32 and n_exact = 4;
    K = 500 is out of reach of a small CPU), as ``smclm train`` times them (time/eval_s,
    time/update_s in metrics.jsonl), medians over the run's evaluations and updates."""
    import tempfile

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from smclm.train import train

    updates = args.eval_updates
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "experiment=infilling_2", f"model={name}", f"model.dtype={args.dtype}",
            f"train.updates={updates}", "train.schedule=linear", f"train.eval_every={updates}",
            "train.progress=false", "exact_samples.n=64", f"exact_samples.cache_dir={tmp}/exact",
            *args.eval_overrides.split(),
        ]  # fmt: skip
        with initialize_config_module("smclm.configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        t0 = time.perf_counter()
        train(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        used = OmegaConf.load(Path(tmp) / "run" / "config.yaml")
        records = [
            json.loads(x)
            for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().split("\n")
            if x.strip()
        ]
    evals = [r["time/eval_s"] for r in records if "time/eval_s" in r]
    ups = [r["time/update_s"] for r in records if "time/update_s" in r]
    # The first update pays one-off costs (allocations, the optimiser's state): left out.
    ups_timed = ups[1:] if len(ups) > 1 else ups
    eval_s, update_s = statistics.median(evals), statistics.median(ups_timed)
    return {
        "eval_over_update": eval_s / update_s,
        "update_s": update_s,
        "eval_s": eval_s,
        "seconds_median": {"eval": eval_s, "update": update_s},
        "seconds_all": {"eval": evals, "update": ups},
        "config": {
            "overrides": overrides,
            "dtype": str(used.model.dtype_resolved),
            "twist": str(used.twist.get("kind")) + "/" + str(used.twist.get("head")),
            "wall_s": wall,
        },
    }


def model_dtype(name: str, args, device: torch.device) -> torch.dtype:
    """toy: float32; smollm2 with --dtype auto: smclm's model.dtype=auto (on a CPU: bfloat16 only
    with native bf16, and only if it agrees with float32; on a GPU: bfloat16 where supported);
    tinystories with auto: bfloat16 on CUDA or a CPU with native bf16."""
    if name == "toy":
        return torch.float32
    if name == "smollm2" and args.dtype == "auto":
        if device.type != "cpu":
            from smclm.models.loading import resolve_dtype as library_dtype

            return library_dtype("auto", device)
        if "smollm2" not in _AUTO:
            _BASES["smollm2"] = build_smollm2("auto")
        return _AUTO["smollm2"][0]
    return resolve_dtype(args.dtype, device)


SECTIONS = {  # section: (function, models it applies to)
    "core": (bench_core, ("toy", "tinystories")),
    "real": (bench_real, ("smollm2",)),
    "grouped": (bench_grouped, ("toy", "tinystories", "smollm2")),
    "eval": (bench_eval_over_update, ("smollm2",)),
}
RAW = {  # the two medians each ratio divides, per section
    "smc_overhead": {"core": ("ours_T", "plain_T"), "real": ("ours", "plain")},
    "speedup_vs_recompute": {"core": ("recompute_T", "ours_T")},
    "length_scaling": {"core": ("ours_4T", "ours_T")},
    "plain_length_scaling": {"core": ("plain_4T", "plain_T")},
    "kv_reorder_overhead": {"core": ("ours_T", "ours_no_kv_reorder_T")},
    "grouped_train_speedup": {"grouped": ("train_looped", "train_batched")},
    "grouped_eval_speedup": {"grouped": ("eval_looped", "eval_batched")},
    "vs_hf_generate": {"real": ("hf_generate", "plain_p0")},
    "eval_over_update": {"eval": ("eval", "update")},
}
SECONDS = {  # plain medians in seconds, reported like the ratios (no target): key -> section's raw
    "update_s": {"eval": "update"},  # one training update (the first left out)
    "eval_s": {"eval": "eval"},  # one evaluation
}


def passes(key: str, value: float, res: dict | None = None) -> bool | None:
    """Whether a ratio meets its target (None: reported, no target). length_scaling also passes
    at <= 1.1 x plain sampling's own length scaling (when that is above 4.5)."""
    if key not in TARGETS:
        return None
    op, target = TARGETS[key]
    if key == "length_scaling" and res is not None and "plain_length_scaling" in res:
        target = max(target, 1.1 * res["plain_length_scaling"])
    return value <= target if op == "<=" else value >= target


def raw_text(key: str, a: str, b: str, med: dict[str, float]) -> str:
    if key == "kv_reorder_overhead":
        return f"({a}={med[a]:.3f}s - {b}={med[b]:.3f}s) / plain_T={med['plain_T']:.3f}s"
    return f"{a}={med[a]:.3f}s / {b}={med[b]:.3f}s"


def invocation(args: list[str]) -> tuple[str, str]:
    """(where it was run from, the command line): the arguments as given, shell-quoted
    (shlex.join), the script's path from the working directory when that is in the repository
    (the Markdown is committed: no absolute path of this machine is written)."""
    root = Path(__file__).resolve().parents[1]
    here = Path.cwd().resolve()
    script = os.path.relpath(Path(__file__).resolve(), here)
    if here == root:
        where = "the repository root"
    elif root in here.parents:
        where = f"`{here.relative_to(root).as_posix()}` in the repository"
    else:
        where = (
            "outside the repository, not recorded; the script's path is from the repository root"
        )
        script = "scripts/bench_smc.py"
    return where, shlex.join(["python", script, *args])


def write_markdown(path: str, results: dict[str, dict[str, dict]], meta: dict) -> None:
    """The results table as Markdown, headed by the command that produced it and the machine
    and its load (1-minute load average before and after the run)."""
    lines = [
        "# `scripts/bench_smc.py` results",
        "",
        f"Produced by (from {meta['where']}):",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}; wall time {meta['wall_s']:.0f} s",
        f"- machine: {meta['machine']}",
        f"- load average (1 min) before / after: {meta['load_before']:.2f} / "
        f"{meta['load_after']:.2f}",
        "",
        "| model | section | metric | value | target | ok | raw seconds (medians) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, sections in results.items():
        for section, res in sections.items():
            for key, value, target, mark, raw in section_rows(section, res):
                raw = raw.replace("|", "\\|")
                lines.append(
                    f"| {model} | {section} | `{key}` | {value:.3f} | {target} | {mark} | {raw} |"
                )
    lines.append("")
    for model, sections in results.items():
        for section, res in sections.items():
            lines.append(f"- {model} / {section}: {config_text(res)}")
    Path(path).write_text("\n".join(lines) + "\n")


def section_rows(section: str, res: dict):
    """(key, value, target, pass/FAIL/-, raw medians) per ratio that a section reports, then its
    plain seconds (``SECONDS``: update_s, eval_s)."""
    med = res["seconds_median"]
    for key, raw in RAW.items():
        if key not in res or section not in raw:
            continue
        ok = passes(key, res[key], res)
        op, target = TARGETS.get(key, ("", ""))
        mark = "-" if ok is None else ("pass" if ok else "FAIL")
        yield key, res[key], f"{op}{target}", mark, raw_text(key, *raw[section], med)
    for key, raw in SECONDS.items():
        if key in res and section in raw:
            yield key, res[key], "", "-", f"seconds: the median {raw[section]} above"


def config_text(res: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in res["config"].items() if k != "overrides")


def print_table(results: dict[str, dict[str, dict]]) -> None:
    hdr = (
        f"{'model':<12} {'metric':<22} {'value':>7} {'target':>8} {'ok':>4}   raw seconds (medians)"
    )
    print(hdr)
    print("-" * len(hdr))
    for model, sections in results.items():
        for section, res in sections.items():
            for key, value, target, mark, raw in section_rows(section, res):
                print(f"{model:<12} {key:<22} {value:>7.3f} {target:>8} {mark:>4}   {raw}")
            print(f"{'':<12} ({section}: {config_text(res)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="toy,tinystories",
                   help="toy, tinystories (random weights) and/or smollm2 (model=smollm2)")  # fmt: skip
    p.add_argument(
        "--sections", default="core,grouped,real,eval",
        help="core (overhead, recompute, length scaling: toy/tinystories), grouped (batched "
        "runs), real (smollm2: smc_overhead and vs_hf_generate at N=64, T=32), eval (smollm2: "
        "eval_over_update); each applies to the models listed for it",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=None, help="particles (default 256; 16 with --quick)")
    p.add_argument(
        "--repeats", type=int, default=None,
        help="rounds timing ours and plain at T_short (default 5 for toy, 1 for tinystories)",
    )  # fmt: skip
    p.add_argument(
        "--long-repeats", type=int, default=None,
        help="rounds that also time ours at T_long and the recompute baseline "
        "(default: --repeats for toy, 1 for tinystories)",
    )  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default 1 for the toy model, whose ~10^4-element ops only lose "
        "to thread hand-offs on a small shared CPU; the torch default for tinystories)",
    )  # fmt: skip
    p.add_argument("--t", type=int, default=None, help="T_short (default 32); T_long = 4 T")
    p.add_argument("--quick", action="store_true", help="smoke run: N=16, T=8/32, 1 repeat")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda")
    p.add_argument("--recompute-logits", choices=["last", "all"], default="last")
    p.add_argument("-v", "--verbose", action="store_true", help="print every timed run")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument(
        "--md", default=None,
        help="also write the table as Markdown, with this command line, the date and the load",
    )  # fmt: skip
    p.add_argument(
        "--grouped", default="auto",
        help="parts of the grouped section: train, eval or train,eval (auto: both for the toy, "
        "train for the large models, whose eval part takes 15-60 minutes on 2 cores)",
    )  # fmt: skip
    p.add_argument("--real-n", type=int, default=64, help="particles of the real section")
    p.add_argument("--real-t", type=int, default=32, help="tokens of the real section")
    p.add_argument("--eval-updates", type=int, default=3, help="updates of the eval section")
    p.add_argument(
        "--eval-overrides", default="evaluator.particles=[32] evaluator.n_exact=4",
        help="the evaluation settings of the eval section (paper: particles=[32,500], n_exact=4)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.n = args.n or (16 if args.quick else 256)
    args.t_short = args.t or (8 if args.quick else 32)
    args.t_long = 4 * args.t_short
    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    torch.manual_seed(SEED)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    results: dict[str, dict[str, dict]] = {}
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    for name in models:
        for section in sections:
            fn, applies = SECTIONS[section]
            if name not in applies:
                continue
            t0 = time.perf_counter()
            res = fn(name, args, device)
            res["wall_s"] = time.perf_counter() - t0
            results.setdefault(name, {})[section] = res
            print(f"[bench] {name} {section}: done in {res['wall_s']:.1f}s", flush=True)
    print()
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.out:
        flat = {  # every ratio at the top of its model's entry, the details per section
            m: {
                **{k: v for r in secs.values() for k, v in r.items() if k in RAW or k in SECONDS},
                **secs,
            }
            for m, secs in results.items()
        }
        Path(args.out).write_text(json.dumps(flat, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    if args.md:
        where, cmd = invocation(list(argv if argv is not None else sys.argv[1:]))
        meta = {
            "where": where,
            "command": cmd,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s": time.perf_counter() - t_start,
            "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}"
            + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
        }
        write_markdown(args.md, results, meta)
        print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
