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
                                                                                  target <= 4.5

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
    .venv/bin/python scripts/bench_smc.py [--models toy,tinystories] [--n 256] [--repeats 5]
        [--threads 1] [--quick] [--out bench.json]

Threads: the toy model runs single-threaded by default (``--threads``): its ops are so small that
a second thread only adds hand-off latency, which on a shared 2-core machine turns into
seconds-long stalls; the TinyStories-shaped model uses torch's default. Every sampler of a model
runs with the same setting.

``--dtype auto`` (the default) uses bfloat16 for the TinyStories-shaped model on CUDA or on a CPU
with native bfloat16 matrix units (AVX512-BF16 / AMX), and float32 on other CPUs, where bfloat16
matrix products are emulated and several times slower than float32 (a single N=256 run at T=128
would take tens of minutes); pass ``--dtype bfloat16`` to force it. The toy model is float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from smclm.models.loading import build_twist  # noqa: E402
from smclm.models.twisted_lm import TwistedLM  # noqa: E402
from smclm.smc.resampling import arrange_in_place, get_resampler  # noqa: E402
from smclm.smc.sampler import ParticleCollapseError, ess, run_smc, sample_categorical  # noqa: E402

TARGETS = {
    "smc_overhead": ("<=", 1.10),
    "speedup_vs_recompute": (">=", 5.0),
    "length_scaling": ("<=", 4.5),
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


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        fast_bf16 = device.type == "cuda" or cpu_has_native_bf16()
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def make_lm(name: str, dtype: torch.dtype, device: torch.device, max_positions: int) -> TwistedLM:
    if name == "toy":
        base, dtype = build_toy(max_positions), torch.float32
    elif name == "tinystories":
        base = build_tinystories_shaped()
    else:
        raise SystemExit(f"unknown model '{name}'; choose toy or tinystories")
    base = base.to(device=device, dtype=dtype).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(SEED)  # the head's hidden layers are drawn from the global RNG
    twist = build_twist("head", base, head="mlp", dtype=dtype)
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


def bench_model(name: str, args, device: torch.device) -> dict:
    dtype = resolve_dtype(args.dtype, device)
    t_short, t_long, n = args.t_short, args.t_long, args.n
    lm = make_lm(name, dtype, device, max_positions=max(256, PROMPT_LEN + t_long + 8))
    v = lm.vocab_size
    gen = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, v, (PROMPT_LEN,), generator=gen).to(device)
    log_phi = count_potential(v)
    recompute = make_recompute(args.recompute_logits == "all")
    run = {"ours": ours, "plain": plain, "recompute": recompute}
    small = name == "toy"
    reps = args.repeats or (5 if small and not args.quick else 1)
    long_reps = args.long_repeats or (reps if small else 1)
    threads = args.threads or (1 if small else torch.get_num_threads())
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"ours_T": [], "plain_T": [], "ours_4T": [], "recompute_T": []}

    def one(kind: str, t_len: int, seed: int) -> float:
        return timed(run[kind], device, lm, prompt, t_len, log_phi, n, seed)

    # Warm-up (excluded): one short run of each sampler (same N and shapes: first-call
    # allocations, kernel selection, CUDA context; T_short/4 steps for the toy, 2 for the large
    # model, whose steps take about a second each). Then round-robin repeats, so that drift on
    # a shared machine hits every measurement alike.
    t_warm = max(2, t_short // 4) if small else 2
    for kind in ("ours", "plain", "recompute"):
        one(kind, t_warm, SEED)
    for r in range(max(reps, long_reps)):
        seed = SEED + 1 + r
        if r < reps:
            times["ours_T"].append(one("ours", t_short, seed))
            times["plain_T"].append(one("plain", t_short, seed))
        if r < long_reps:
            times["ours_4T"].append(one("ours", t_long, seed))
            times["recompute_T"].append(one("recompute", t_short, seed))
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
        "model": name,
        "smc_overhead": med["ours_T"] / med["plain_T"],
        "speedup_vs_recompute": med["recompute_T"] / med["ours_T"],
        "length_scaling": med["ours_4T"] / med["ours_T"],
        "paired_ratios": {
            "smc_overhead": paired(ours_t, times["plain_T"]),
            "speedup_vs_recompute": paired(times["recompute_T"], ours_t),
            "length_scaling": paired(times["ours_4T"], ours_t),
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


def passes(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return value <= target if op == "<=" else value >= target


def print_table(results: list[dict]) -> None:
    hdr = (
        f"{'model':<12} {'metric':<22} {'ratio':>7} {'target':>8} {'ok':>4}   raw seconds (medians)"
    )
    print(hdr)
    print("-" * len(hdr))
    raw = {
        "smc_overhead": ("ours_T", "plain_T"),
        "speedup_vs_recompute": ("recompute_T", "ours_T"),
        "length_scaling": ("ours_4T", "ours_T"),
    }
    for res in results:
        med, cfg = res["seconds_median"], res["config"]
        for key, (op, target) in TARGETS.items():
            a, b = raw[key]
            ok = "pass" if passes(key, res[key]) else "FAIL"
            print(
                f"{res['model']:<12} {key:<22} {res[key]:>7.3f} {op + str(target):>8} {ok:>4}   "
                f"{a}={med[a]:.3f}s / {b}={med[b]:.3f}s"
            )
        print(
            f"{'':<12} (N={cfg['n_particles']}, T={cfg['t_short']}/{cfg['t_long']}, "
            f"V={cfg['vocab_size']}, {cfg['dtype']}, {cfg['device']}, "
            f"{cfg['threads']} threads, repeats={cfg['repeats']}/{cfg['long_repeats']})"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="toy,tinystories")
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
    args = p.parse_args(argv)
    args.n = args.n or (16 if args.quick else 256)
    args.t_short = args.t or (8 if args.quick else 32)
    args.t_long = 4 * args.t_short
    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    torch.manual_seed(SEED)

    results = []
    t_start = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        res = bench_model(name, args, device)
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"[bench] {name}: done in {res['wall_s']:.1f}s", flush=True)
    print()
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps({r["model"]: r for r in results}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
