"""RL study (issue 14): exact KL(σ‖q) trajectories of RL with the paper's update and with the
defaults, beside CTL's, on toy worlds that differ in seed, peakedness and potential.

Every run is what `smclm train experiment=toy_rl` (or toy_ctl) does on that world: the method
options, learning rate and K come from those experiment configs (variants override options
only), an MLP twist head seeded with the run seed, and the exact KL(σ‖q) by enumeration every
`--every` updates. Worlds: V = 12, T = 3 (1728 outputs), ε = 1e-3, min_count = 1.

    python scripts/rl_study.py                         # all worlds, seeds 0-4, 300 updates
    python scripts/rl_study.py --worlds indicator_peaked --seeds 0 1 --json out.json

Prints one line per run (KL/KL₀ at every evaluation) and a summary per world and variant: the
mean over seeds of KL(σ‖q) at each evaluation, the mean and worst of "last3" (the mean of the
last three evaluations over the initial KL) and the worst relapse (the highest KL/KL₀ after it
first fell below 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from smclm.build import METHOD_WORLD_KEYS  # noqa: E402
from smclm.evaluators.exact import exact_metrics, solve  # noqa: E402
from smclm.methods import build_method  # noqa: E402
from smclm.methods.base import TrainContext  # noqa: E402
from smclm.methods.rl import PAPER  # noqa: E402
from smclm.models.loading import build_twist  # noqa: E402
from smclm.models.toy import build_toy_model, build_toy_tokenizer, encode_toy_prompt  # noqa: E402
from smclm.models.twisted_lm import TwistedLM  # noqa: E402
from smclm.tasks.toy import build_toy_task  # noqa: E402

# name: (model seed, sharpness, prompt, target ids, potential, β)
WORLDS = {
    "indicator_peaked": (0, 6.0, "the cat", [10], "threshold", 1.0),
    "indicator_flat": (3, 2.0, "the", [9], "threshold", 1.0),
    "exp_count_peaked": (1, 4.0, "the cat", [10], "exp_count", 4.0),
    "exp_count_flat": (2, 2.0, "the", [10], "exp_count", 4.0),
    "toy_default": (0, 4.0, "the cat", [9], "threshold", 1.0),  # experiment=toy_rl's own world
}

# name: (experiment, method option overrides)
VARIANTS = {
    "rl_paper": ("toy_rl", PAPER),
    "rl_default": ("toy_rl", {}),
    "rl_target_ema": ("toy_rl", {"target_ema": 0.95}),
    "rl_lr_half_life": ("toy_rl", {"lr_half_life": 100}),
    "rl_exact": ("toy_rl", {"positives": "exact"}),
    "ctl": ("toy_ctl", {}),
}


def experiment_settings(experiment: str) -> tuple[str, dict, float, int]:
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    options = {k: v for k, v in cfg.method.items() if k not in METHOD_WORLD_KEYS}
    return str(cfg.method.name), options, float(cfg.optimizer.lr), int(cfg.smc.n_particles)


def build_world(name: str):
    seed, sharp, prompt, target, potential, beta = WORLDS[name]
    base = build_toy_model(vocab_size=12, seed=seed, sharpness=sharp)
    ids = torch.tensor(encode_toy_prompt(build_toy_tokenizer(12), prompt))
    task = build_toy_task(ids, 3, potential, target, 12, min_count=1, epsilon=1e-3, beta=beta)
    sol = solve(TwistedLM(base), task)
    gen = torch.Generator().manual_seed(1234)
    pool = sol.sequences[torch.multinomial(sol.log_sigma.exp(), 256, True, generator=gen)]
    return base, task, sol, pool


def run(world, method_name, options, lr, k, seed, updates, every) -> list[float]:
    """Exact KL(σ‖q) after 0, every, 2·every, … updates (the trainer's update step)."""
    base, task, sol, pool = world
    torch.manual_seed(seed)
    model = TwistedLM(base, build_twist("head", base, head="mlp"))
    method = build_method(method_name, **options)
    batch = TrainContext(model, task, k, torch.Generator().manual_seed(seed), exact_pool=pool)
    owns = hasattr(method, "update")
    if owns:
        method.setup(batch, lr)
    else:
        opt = torch.optim.Adam(model.twist.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    kls = [exact_metrics(model, task, sol)["kl/sigma_q_exact"]]
    for step in range(1, updates + 1):
        if owns:
            method.update(batch)
        else:
            loss, _ = method.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if step % every == 0:
            kls.append(exact_metrics(model, task, sol)["kl/sigma_q_exact"])
    return kls


def scores(kls: list[float]) -> tuple[float, float | None]:
    """(last3 = mean of the last three KL/KL₀, worst KL/KL₀ after first falling below 0.5)."""
    r = [x / kls[0] for x in kls]
    below = [i for i, x in enumerate(r) if x < 0.5]
    return sum(r[-3:]) / 3, (max(r[below[0] :]) if below else None)


def step_values(model: TwistedLM, task, sol) -> torch.Tensor:
    """log ψ_t(s_1:t) [M, T] of the twist on every output s (teacher-forced)."""
    with torch.no_grad():
        ids, h, start = model.base_pass(task.prompt_ids, sol.sequences)
        out = model.twist.full(ids, h, start, None)
    return out.gather(-1, sol.sequences[..., None]).squeeze(-1).double()


def star_values(sol) -> tuple[torch.Tensor, torch.Tensor]:
    """log ψ*_t(s_1:t) [M, T] and the whole tables' rows log ψ*_t(s_<t, ·) [M, T, V]."""
    tables, seqs = sol.psi_star_tables(), sol.sequences
    idx = torch.zeros(seqs.shape[0], dtype=torch.long)
    rows = []
    for t in range(sol.output_len):
        rows.append(tables[t][idx])
        idx = idx * sol.vocab_size + seqs[:, t]
    full = torch.stack(rows, 1)
    return full.gather(-1, seqs[..., None]).squeeze(-1).double(), full


def diagnose(name: str, settings: dict, updates: int) -> None:
    """Can the twist represent ψ*? Where is RL's log ψ wrong after training (seed 0)?"""
    base, task, sol, pool = build_world(name)
    star, star_full = star_values(sol)
    sigma = sol.log_sigma.exp()
    torch.manual_seed(0)
    model = TwistedLM(base, build_twist("head", base, head="mlp"))
    opt = torch.optim.Adam(model.twist.parameters(), lr=3e-3)
    ids, h, start = model.base_pass(task.prompt_ids, sol.sequences)
    w = sigma.float()[:, None, None]
    for _ in range(1500):  # full-batch regression of every table entry, σ-weighted
        loss = (w * (model.twist.full(ids, h, start, None) - star_full).pow(2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    kl = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    print(f"{name}: the MLP head fitted to ψ* by supervised regression: KL(σ‖q) = {kl:.4f}")
    target = torch.tensor(WORLDS[name][3])
    early = torch.isin(sol.sequences[:, :-1], target).any(1)
    last = torch.isin(sol.sequences[:, -1], target)
    regions = {"target token before s_T": early, "only s_T": last & ~early, "none": ~early & ~last}
    for v in ("rl_paper", "rl_default"):
        if v not in settings:
            continue
        method_name, options, lr, k = settings[v]
        torch.manual_seed(0)
        model = TwistedLM(base, build_twist("head", base, head="mlp"))
        method = build_method(method_name, **options)
        batch = TrainContext(model, task, k, torch.Generator().manual_seed(0), exact_pool=pool)
        method.setup(batch, lr)
        for _ in range(updates):
            method.update(batch)
        err = step_values(model, task, sol) - star
        kl = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
        print(f"{name} {v} seed 0 after {updates} updates: KL(σ‖q) = {kl:.3f}; σ-weighted mean "
              "of log ψ_t − log ψ*_t for t = 1..T, by where the target tokens are:")  # fmt: skip
        for label, mask in regions.items():
            m = sigma * mask
            mean = [float((err[:, t] * m).sum() / m.sum()) for t in range(err.shape[1])]
            print(
                f"  {label:26s} σ mass {float(m.sum()):.3f}: " + " ".join(f"{x:+.2f}" for x in mean)
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS)[:4], choices=list(WORLDS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--json", help="also write every trajectory to this JSON file")
    ap.add_argument("--diagnose", choices=list(WORLDS), help="only the diagnosis on this world")
    args = ap.parse_args()
    torch.set_num_threads(1)

    settings = {}
    for v in args.variants:
        experiment, overrides = VARIANTS[v]
        name, options, lr, k = experiment_settings(experiment)
        settings[v] = (name, {**options, **overrides}, lr, k)
        print(f"# {v}: method={name} lr={lr} K={k} options={settings[v][1]}", flush=True)
    if args.diagnose:
        diagnose(args.diagnose, settings, args.updates)
        return
    results: dict = {}
    t0 = time.perf_counter()
    for w in args.worlds:
        world = build_world(w)
        kl_p0 = world[2].kl(world[2].log_p0)["sigma_q"]
        print(f"# world {w}: {WORLDS[w]}, KL(σ‖p₀) = {kl_p0:.3f}", flush=True)
        for v in args.variants:
            name, options, lr, k = settings[v]
            for s in args.seeds:
                kls = run(world, name, options, lr, k, s, args.updates, args.every)
                results.setdefault(w, {}).setdefault(v, {})[s] = kls
                last3, relapse = scores(kls)
                rel = "-" if relapse is None else f"{relapse:.2f}"
                print(
                    f"{w} {v} seed {s}: last3 {last3:.3f} relapse {rel} | KL/KL0 "
                    + " ".join(f"{x / kls[0]:.2f}" for x in kls)
                    + f"  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )

    steps = list(range(0, args.updates + 1, args.every))
    print(f"\nmean exact KL(σ‖q) over seeds {args.seeds} after n updates")
    print("| world | variant | " + " | ".join(str(n) for n in steps) + " | last3 mean (worst) | "
          "worst relapse | seeds meeting both |")  # fmt: skip
    print("|---|---|" + "---|" * (len(steps) + 3))
    for w, by_v in results.items():
        for v, by_s in by_v.items():
            trajs = list(by_s.values())
            means = [statistics.mean(t[i] for t in trajs) for i in range(len(steps))]
            sc = [scores(t) for t in trajs]
            last3 = [a for a, _ in sc]
            rel = [b for _, b in sc if b is not None]
            ok = sum(1 for a, b in sc if a <= 0.5 and b is not None and b <= 0.8)
            worst_rel = f"{max(rel):.2f}" if rel else "-"
            print(
                f"| {w} | {v} | "
                + " | ".join(f"{m:.3f}" for m in means)
                + f" | {statistics.mean(last3):.3f} ({max(last3):.3f}) | {worst_rel} | "
                f"{ok}/{len(sc)} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "worlds": WORLDS, "kl": results}, f, indent=1)


if __name__ == "__main__":
    main()
