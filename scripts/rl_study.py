"""RL study (issues 14 and 20): exact KL(σ‖q) of RL beside the other learners on a generated
family of toy worlds.

The family (:data:`GRID`, :func:`family_world`): threshold potentials with min_count 1, 2, 3 and
exp_count potentials with β = 1, 2, 4, 8, each with T = 4 and 6 and a peaked (sharpness 6) or a
flat (sharpness 2) toy model: 28 worlds. V = 8 (8⁶ = 262144 outputs), ε = 1e-3. World i's seed i
picks the model's weights, the prompt and the order in which target tokens are tried: the target
set is the first (single tokens, then growing sets) whose P_p₀(count ≥ min_count) (threshold;
count ≥ 1 for exp_count) lies in [1%, 50%].

Every run is what `smclm train experiment=toy_<m> model=toy <world overrides> seed=<s>` does
(the config is composed, the world built by smclm.build.build_world, and the learner stepped as
smclm.train does), except that the exact KL(σ‖q) is computed only at 0 and at the last three
scheduled evaluations (the trainer's evaluations do not touch the training RNG, so the numbers
are the same). Variants override method options or the learning rate only.

    python scripts/rl_study.py --json family.json                  # 28 worlds × seeds 0-2
    python scripts/rl_study.py --worlds 20 24 --variants rl rl_paper --seeds 0
    python scripts/rl_study.py --diagnose 20                       # why the one-step target stalls
    python scripts/rl_study.py --table a.json b.json               # one table from --json files

Prints one line per run and a table: per world and variant, last3 = the mean of the last three
evaluations over KL₀, as the mean over seeds and the worst seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402

from smclm.build import build_world  # noqa: E402
from smclm.evaluators.exact import exact_metrics, solve  # noqa: E402
from smclm.methods.base import TrainContext  # noqa: E402
from smclm.methods.rl import PAPER  # noqa: E402
from smclm.models.toy import build_toy_model, build_toy_tokenizer, encode_toy_prompt  # noqa: E402
from smclm.models.twisted_lm import TwistedLM  # noqa: E402
from smclm.tasks.toy import build_toy_task  # noqa: E402

VOCAB, EPSILON = 8, 1e-3
PROMPTS = ("the", "the cat", "a dog", "the mat and")
SHARPNESS = {"peaked": 6.0, "flat": 2.0}
# (potential, min_count, β, T, p₀)
GRID = [
    ("threshold", m, 1.0, t, p) for m in (1, 2, 3) for t in (4, 6) for p in ("peaked", "flat")
] + [("exp_count", 1, b, t, p) for b in (1.0, 2.0, 4.0, 8.0) for t in (4, 6) for p in ("peaked", "flat")]  # fmt: skip

# name: (experiment, method option overrides, lr override or None)
VARIANTS = {
    "rl": ("toy_rl", {}, None),
    "rl_previous": ("toy_rl", {"td_lambda": 0.0}, 1e-3),  # the defaults before issue 20
    "rl_paper": ("toy_rl", PAPER, None),
    "ctl": ("toy_ctl", {}, None),
    "dpg": ("toy_dpg", {}, None),
    "sixo": ("toy_sixo", {}, None),
    "fudge": ("toy_fudge", {}, None),
    "ppo": ("toy_ppo", {}, None),
    "gfn": ("toy_gfn", {}, None),
}


def compose_cfg(overrides: list[str]):
    """The train config with these overrides (Hydra's global state is left as it was found)."""
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


def family_world(i: int) -> dict:
    """World i of the family: its settings and P_p₀(φ > 0) (count ≥ 1 for exp_count)."""
    potential, min_count, beta, t_len, peak = GRID[i]
    rng = random.Random(i)
    prompt = rng.choice(PROMPTS)
    order = rng.sample(range(2, VOCAB), VOCAB - 2)
    base = build_toy_model(vocab_size=VOCAB, seed=i, sharpness=SHARPNESS[peak])
    ids = torch.tensor(encode_toy_prompt(build_toy_tokenizer(VOCAB), prompt))
    need = min_count if potential == "threshold" else 1
    best = None
    for target in [[t] for t in order] + [sorted(order[:n]) for n in range(2, VOCAB - 1)]:
        hit = build_toy_task(ids, t_len, "threshold", target, VOCAB, min_count=need, epsilon=0.0)
        sol = solve(TwistedLM(base), hit)
        p_hit = float(torch.logsumexp(sol.log_p0 + sol.log_phi, 0).exp())
        miss = max(0.01 - p_hit, p_hit - 0.5, 0.0)
        if best is None or miss < best[0]:
            best = (miss, target, p_hit)
        if miss == 0.0:
            break
    _, target, p_hit = best
    return {
        "index": i,
        "potential": potential,
        "min_count": min_count,
        "beta": beta,
        "T": t_len,
        "p0": peak,
        "prompt": prompt,
        "target_ids": target,
        "p_hit": p_hit,
    }


def world_overrides(w: dict) -> list[str]:
    return [
        "model=toy",
        f"model.toy.seed={w['index']}",
        f"model.toy.vocab_size={VOCAB}",
        f"model.toy.sharpness={SHARPNESS[w['p0']]}",
        f"task.prompt='{w['prompt']}'",
        f"task.output_len={w['T']}",
        f"task.potential={w['potential']}",
        "task.target_ids=[" + ",".join(map(str, w["target_ids"])) + "]",
        f"task.min_count={w['min_count']}",
        f"task.beta={w['beta']}",
        f"task.epsilon={EPSILON}",
    ]


def variant_overrides(variant: str) -> list[str]:
    experiment, options, lr = VARIANTS[variant]
    out = [f"experiment={experiment}"]
    out += [f"method.{k}={'null' if v is None else v}" for k, v in options.items()]
    return out + ([] if lr is None else [f"optimizer.lr={lr}"])


def run(
    w: dict,
    variant: str,
    seed: int,
    solution=None,
    every_eval: bool = False,
    hook=None,
    extra: tuple[str, ...] = (),
):
    """Exact KL(σ‖q) {updates: value} of one training run, and the exact solution. extra:
    more config overrides (e.g. train.updates=…)."""
    overrides = variant_overrides(variant) + world_overrides(w) + [f"seed={seed}", *extra]
    cfg = compose_cfg(overrides)
    world = build_world(cfg)
    model, task, method = world.model, world.task, world.learner
    sol = solution if solution is not None else solve(TwistedLM(model.base), task)
    updates, every = int(cfg.train.updates), int(cfg.train.eval_every)
    at = set(range(every, updates + 1, every))
    if not every_eval:
        at = set(sorted(at | {updates})[-3:])
    batch = TrainContext(model, task, int(cfg.smc.n_particles), torch.Generator().manual_seed(seed))
    lr = float(cfg.optimizer.lr)
    owns = hasattr(method, "update")
    if owns:
        method.setup(batch, lr)
    else:
        params = [p for p in model.trainables().parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    kls = {0: exact_metrics(model, task, sol)["kl/sigma_q_exact"]}
    for step in range(1, updates + 1):
        if owns:
            method.update(batch)
        else:
            loss, _ = method.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if hook is not None:
            hook(step, model, method, task, sol)
        if step in at:
            kls[step] = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
    return kls, sol


def last3(kls: dict) -> float:
    """The mean of the last three evaluations over the first (KL₀)."""
    steps = sorted(kls)
    return sum(kls[s] for s in steps[-3:]) / 3 / kls[0]


# -- the diagnosis (issue 20) ---------------------------------------------------------------------


def diagnose(i: int, updates_shown=(0, 10, 25, 50, 100)) -> None:
    """On world i, seed 0: the σ-weighted mean per t of log ψ*_t, of the twist's V_t, of the
    one-step targets Y_t and of the λ = 1 targets G_t on the exact σ (every output, σ-weighted),
    during training with the previous defaults; then the same training with the regression
    targets replaced by the exact log ψ*_t (same samples, weights, lr and updates) and with the
    learning rate ×3 and ×10."""
    import smclm.methods.rl as rl_module

    w = family_world(i)
    print(f"# world {i}: {w}")
    cfg = compose_cfg(variant_overrides("rl_previous") + world_overrides(w) + ["seed=0"])
    world = build_world(cfg)
    sol = solve(TwistedLM(world.model.base), world.task)
    seqs, v, t_len = sol.sequences, sol.vocab_size, sol.output_len
    sigma = sol.log_sigma.exp()
    tables = sol.psi_star_tables()
    idx = torch.zeros(seqs.shape[0], dtype=torch.long)
    rows = []
    for t in range(t_len):
        rows.append(tables[t][idx])
        idx = idx * v + seqs[:, t]
    star = torch.stack(rows, 1).gather(-1, seqs[..., None]).squeeze(-1).double()
    kl_p0 = sol.kl(sol.log_p0)["sigma_q"]
    phis = sorted(set(round(x, 3) for x in sol.log_phi.tolist()))
    print(f"log φ takes {phis}; KL(σ‖p₀) = {kl_p0:.3f}; σ-weighted mean over t = 1..T of")
    fmt = lambda xs: " ".join(f"{float(x):6.2f}" for x in xs)  # noqa: E731
    print(f"  log ψ*_t            {fmt((sigma[:, None] * star).sum(0))}")

    def hook(step, model, method, task, _sol):
        if step not in updates_shown:
            return
        with torch.no_grad():
            sigma_rl = rl_module.RL(td_lambda=0.0)
            values, y, _ = sigma_rl.regression(model, task, seqs, sol.log_phi.float(), None)
            mc = rl_module.RL(td_lambda=1.0)
            _, g, _ = mc.regression(model, task, seqs, sol.log_phi.float(), None)
        kl = exact_metrics(model, task, sol)["kl/sigma_q_exact"]
        s = sigma[:, None].float()
        print(
            f"  after {step:3d} updates (KL {kl:.3f}): V_t {fmt((s * values).sum(0))} | "
            f"Y_t {fmt((s * y).sum(0))} | G_t (λ=1) {fmt((s * g).sum(0))}"
        )

    hook(0, world.model, None, world.task, sol)
    kls, _ = run(w, "rl_previous", 0, sol, hook=hook)
    print(f"rl_previous (one-step Y_t, lr 1e-3): last3/KL₀ = {last3(kls):.3f}")

    pw = v ** torch.arange(t_len - 1, -1, -1)
    star_f = star.float()
    original = rl_module.RL.regression

    def supervised(self, model, prompt, tokens, log_phi, cond):
        values, _ = original(self, model, prompt, tokens, log_phi, cond)
        return values, star_f[(tokens * pw).sum(1)]

    rl_module.RL.regression = supervised
    try:
        kls, _ = run(w, "rl_previous", 0, sol)
    finally:
        rl_module.RL.regression = original
    print(f"rl_previous with targets log ψ*_t (supervised): last3/KL₀ = {last3(kls):.3f}")
    for factor in (3, 10):
        VARIANTS["_lr"] = ("toy_rl", {"td_lambda": 0.0}, 1e-3 * factor)
        kls, _ = run(w, "_lr", 0, sol)
        print(f"rl_previous with lr {1e-3 * factor:g}: last3/KL₀ = {last3(kls):.3f}")
    del VARIANTS["_lr"]
    kls, _ = run(w, "rl", 0, sol)
    print(f"rl (defaults: λ = 1, lr 2e-3): last3/KL₀ = {last3(kls):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", nargs="+", type=int, default=list(range(len(GRID))))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--json", help="also write every run's KLs to this JSON file")
    ap.add_argument("--diagnose", type=int, help="only the diagnosis on this world")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="only the table of --json files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.table:
        table_from_json(args.table)
        return
    if args.diagnose is not None:
        diagnose(args.diagnose)
        return
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch threads 1")
    results: dict = {}
    t0 = time.perf_counter()
    for i in args.worlds:
        w = family_world(i)
        sol = None
        for v in args.variants:
            for s in args.seeds:
                kls, sol = run(w, v, s, sol)
                results.setdefault(i, {"world": w, "kl0": kls[0]}).setdefault(v, {})[s] = kls
                print(
                    f"world {i} {GRID[i]} {v} seed {s}: KL0 {kls[0]:.3f} last3 {last3(kls):.3f}"
                    f"  [{time.perf_counter() - t0:.0f}s]",
                    flush=True,
                )
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    print_table(results, args.variants, args.seeds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def print_table(results: dict, variants: list[str], seeds: list[int]) -> None:
    """Per world: last3/KL₀ of each variant, mean over seeds (worst seed); the worst per variant."""
    print(f"last3/KL₀: mean over seeds {seeds} (worst seed)")
    print("| world | potential | β / min_count | T | p₀ | P(φ>0) | KL₀ | " + " | ".join(variants) + " |")  # fmt: skip
    print("|---" * (7 + len(variants)) + "|")
    worst = {v: 0.0 for v in variants}
    for i, r in results.items():
        w = r["world"]
        knob = f"β={w['beta']:g}" if w["potential"] == "exp_count" else f"m={w['min_count']}"
        cells = []
        for v in variants:
            l3 = [last3({int(k): x for k, x in kls.items()}) for kls in r[v].values()]
            worst[v] = max(worst[v], max(l3))
            cells.append(f"{statistics.mean(l3):.3f} ({max(l3):.3f})")
        print(
            f"| {i} | {w['potential']} | {knob} | {w['T']} | {w['p0']} | {w['p_hit']:.3f} | "
            f"{r['kl0']:.2f} | " + " | ".join(cells) + " |"
        )
    print("| worst | | | | | | | " + " | ".join(f"{worst[v]:.3f}" for v in variants) + " |")


def table_from_json(paths: list[str]) -> None:
    """One table from the --json files of several runs of this script (same worlds and seeds)."""
    results: dict = {}
    variants: list[str] = []
    seeds: list[int] = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        variants += [v for v in data["args"]["variants"] if v not in variants]
        seeds = data["args"]["seeds"]
        for i, r in data["results"].items():
            results.setdefault(int(i), {}).update(r)
    print_table(dict(sorted(results.items())), variants, seeds)


if __name__ == "__main__":
    main()
