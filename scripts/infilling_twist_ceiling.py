"""How far can a twist head lower E_o KL(σ‖q) on infilling with a given number of exact pairs?

A diagnostic for the learners' results on conditional tasks (docs/results/table8_smollm2_cpu.md):
it trains the twisted proposal q(s | o) ∝ p₀(s) ψ(s, o) by *direct maximum likelihood* on exact
(s, o) pairs (joint samples of p₀: s is an exact sample of σ(· | o)), which minimises KL(σ‖q)
itself — the best case for a learner that sees the same pairs, not a learner of the paper. Two
parts, each from a fresh head (log ψ ≡ 0, q = p₀):

* ``fresh``: every step draws ``--pairs`` new pairs (amortised learning over o);
* ``fixed``: every step reuses the same ``--fixed`` pairs (can the head fit them at all?).

Both report the change of E_o KL(σ‖q) on ``--held-out`` held-out pairs, −(change of G_q) with
G_q the mean log q(s | o) over them (the constant E log σ cancels), with a paired standard
error; ``fixed`` also reports it on its training pairs. Hydra overrides after ``--`` pick the
experiment, model, twist and dtype (default: the Table-8 ``cpu`` profile's head on SmolLM2).

``--information N`` (c = 1 only) first measures what there is to learn: E_o KL(σ(· | o)‖p₀) is
the mutual information I(S; O) between the T tokens and the next one, estimated from N joint
samples as E_s Σ_o p₀(o | s) log p₀(o | s) / p̂₀(o) (every o of the vocabulary at once), with
p̂₀(o) the mean of p₀(o | s') over the *other* half of the samples (cross-fitted, so a sample
is not its own evidence), and split by p̂₀(o) of the sampled o: how much of the KL lives in o's
that a learner sees often, and how much in rare ones, which only generalisation over o reaches.

    python scripts/infilling_twist_ceiling.py [--steps 200] [--pairs 64] [--lr 1e-3]
        [--fixed 128] [--fixed-steps 100] [--held-out 256] [--information N] [--out f.json]
        [-- overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

DEFAULT = ["experiment=infilling_2", "model=smollm2", "twist=mlp", "twist.output=embedding",
           "method=ctl", "device=cpu"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="fresh-pair steps")
    ap.add_argument("--pairs", type=int, default=64, help="pairs per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    ap.add_argument("--fixed", type=int, default=128, help="pairs of the fixed set")
    ap.add_argument("--fixed-steps", type=int, default=100, help="steps on the fixed set")
    ap.add_argument("--held-out", type=int, default=256, help="held-out pairs")
    ap.add_argument("--information", type=int, default=0, metavar="N",
                    help="first estimate I(S; O) = E_o KL(σ‖p₀) from N joint samples (c = 1)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hydra import compose, initialize_config_module

    from smclm.build import build_world

    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose("train", overrides=[*DEFAULT, f"seed={args.seed}", *extra])
    if not cfg.task.get("cond_len"):
        print("infilling_twist_ceiling: the task has no conditioning tokens o; use an "
              "infilling experiment (experiment=infilling_2)", file=sys.stderr)  # fmt: skip
        return 2
    if args.information and (cfg.task.cond_len != 1 or args.information < 4):
        print("infilling_twist_ceiling: --information needs task.cond_len=1 and N >= 4 "
              f"(got c = {cfg.task.cond_len}, N = {args.information})", file=sys.stderr)  # fmt: skip
        return 2
    world = build_world(cfg)
    model, task = world.model, world.task
    init = {k: v.clone() for k, v in model.trainables().state_dict().items()}
    gen = torch.Generator().manual_seed(args.seed)
    info = information(model, task, args.information, gen) if args.information else None
    with torch.no_grad():
        held_s, held_o = task.sample_joint(model, args.held_out, gen)

    def log_q(s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:  # [N]: log q(s | o)
        out = []
        for i in range(0, len(s), 64):
            lq = model.sequence_log_probs(task.prompt_ids, s[i : i + 64], o[i : i + 64])["log_q"]
            out.append(lq.sum(1))
        return torch.cat(out)

    def change(before: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            d = -(log_q(s, o) - before)  # per pair: the change of log σ − log q
        return float(d.mean()), float(d.std() / len(d) ** 0.5)

    def fresh_head() -> torch.optim.Optimizer:
        model.trainables().load_state_dict(init)
        params = [p for p in model.trainables().parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=args.lr)

    with torch.no_grad():
        held0 = log_q(held_s, held_o)
    results: dict = {"command": " ".join(["scripts/infilling_twist_ceiling.py", *argv]),
                     "dtype": cfg.model.dtype_resolved, "information": info,
                     "fresh": [], "fixed": []}  # fmt: skip
    checkpoints = {args.steps} | {2**k for k in range(3, 20) if 2**k < args.steps}
    t0 = time.perf_counter()
    opt = fresh_head()
    print(f"fresh pairs: {args.pairs} per step, lr {args.lr}, {cfg.model.dtype_resolved}")
    for step in range(1, args.steps + 1):
        with torch.no_grad():
            s, o = task.sample_joint(model, args.pairs, gen)
        loss = -log_q(s, o).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in checkpoints:
            d, se = change(held0, held_s, held_o)
            row = {"step": step, "pairs_seen": step * args.pairs, "held_out_dkl": d, "se": se}
            results["fresh"].append(row)
            print(f"  step {step:5d} ({step * args.pairs:7d} pairs): held-out ΔKL(σ‖q) "
                  f"{d:+.3f} ± {se:.3f}   [{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    with torch.no_grad():
        fix_s, fix_o = task.sample_joint(model, args.fixed, gen)
    opt = fresh_head()
    with torch.no_grad():
        fix0 = log_q(fix_s, fix_o)
    print(f"fixed pairs: the same {args.fixed} at every step")
    every = max(1, args.fixed_steps // 5)
    for step in range(1, args.fixed_steps + 1):
        loss = -log_q(fix_s, fix_o).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == args.fixed_steps:
            dt, set_ = change(fix0, fix_s, fix_o)
            dh, seh = change(held0, held_s, held_o)
            results["fixed"].append({"step": step, "train_dkl": dt, "train_se": set_,
                                     "held_out_dkl": dh, "held_out_se": seh})  # fmt: skip
            print(f"  step {step:5d}: training pairs ΔKL(σ‖q) {dt:+.3f} ± {set_:.3f}, held-out "
                  f"{dh:+.3f} ± {seh:.3f}   [{time.perf_counter() - t0:.0f} s]", flush=True)  # fmt: skip
    results["wall_s"] = time.perf_counter() - t0
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def information(model, task, n: int, gen: torch.Generator) -> dict:
    """I(S; O) = E_o KL(σ(· | o)‖p₀) for c = 1 from n joint samples, and its split by p̂₀(o)."""
    from smclm.models.cache import prompt_shared_hidden

    with torch.no_grad():
        s, o = task.sample_joint(model, n, gen)
        o = o[:, 0]
        prompt = task.prompt_ids.to(s.device)
        log_p = []  # log p₀(· | prompt, s) at the position of o, [n, V], in chunks of rows
        for i in range(0, n, 256):
            h = prompt_shared_hidden(model.body, prompt, s[i : i + 256])[:, -1]
            log_p.append(model.log_p0_from_hidden(h).double())
        lp = torch.cat(log_p)
        p = lp.exp()
        halves = (slice(0, n // 2), slice(n // 2, n))
        rb = torch.empty(n, dtype=torch.float64, device=lp.device)
        log_p_o = torch.empty(n, dtype=torch.float64, device=lp.device)  # log p̂₀(o) per pair
        for rows, other in zip(halves, reversed(halves)):
            # p̂₀ for these rows: the mean of p₀(· | s') over the other half's rows s'
            log_m = p[other].mean(0).clamp_min(1e-300).log()  # [V]
            rb[rows] = (p[rows] * (lp[rows] - log_m)).sum(-1)  # KL(p₀(· | s) ‖ p̂₀), every o
            log_p_o[rows] = log_m[o[rows]]
        point = lp.gather(1, o[:, None])[:, 0] - log_p_o
        p_o = log_p_o.exp()
    res: dict = {"n": n, "i_so": float(rb.mean()), "i_so_se": float(rb.std() / n**0.5),
                 "i_so_sampled": float(point.mean()), "i_so_sampled_se": float(point.std() / n**0.5),
                 "distinct_o": int(o.unique().numel()), "by_p0_o": []}  # fmt: skip
    print(f"I(S; O) = E_o KL(σ‖p₀) from {n} joint samples: {res['i_so']:.3f} ± {res['i_so_se']:.3f}"
          f" nats (sampled o: {res['i_so_sampled']:.3f} ± {res['i_so_sampled_se']:.3f}); "
          f"{res['distinct_o']} distinct o")  # fmt: skip
    edges = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 0.0]
    for hi, lo in zip(edges[:-1], edges[1:]):
        sel = (p_o <= hi) & (p_o > lo)
        if not bool(sel.any()):
            continue
        row = {"p0_o": [lo, hi], "pairs": float(sel.double().mean()),
               "distinct_o": int(o[sel].unique().numel()), "mean_pointwise": float(point[sel].mean()),
               "share_of_i": float(point[sel].sum() / point.sum())}  # fmt: skip
        res["by_p0_o"].append(row)
        print(f"  p̂₀(o) in ({lo:g}, {hi:g}]: {100 * row['pairs']:5.1f} % of pairs, "
              f"{row['distinct_o']:5d} distinct o, log p₀(o | s)/p̂₀(o) {row['mean_pointwise']:5.2f}"
              f" on average, {100 * row['share_of_i']:5.1f} % of I", flush=True)  # fmt: skip
    return res


if __name__ == "__main__":
    sys.exit(main())
