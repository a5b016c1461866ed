"""Benchmark: GFlowNet's prefix rewards on ``task=latent`` (modified SubTB scores the reward of
every prefix + stop of every trajectory), one pass per row (``LatentPotential.prefix_log_phi``)
against the potential called on every "prefix + stop" sequence (the general path of
``smclm.methods.gfn._prefix_log_phi``), on the same trajectories in one process.

The world is ``smclm train experiment=gfn_arithmetic`` (SmolLM2 offline, the calculator, the
3-shot reward prompt) with the overrides given after ``--``; the trajectories are ``--n`` samples
of p₀ with the tool for the first training question, made once. After one warm-up call of each,
``--repeats`` rounds time both, alternately. Printed and written (``--out``, JSON):

* ``prefix_rewards_speedup`` = median time of the per-prefix path / median time of the one-pass
  path (reported, no target);
* ``max_abs_diff``: the largest |difference| of their log φ over all (row, prefix, stop).

    python scripts/bench_gfn_prefix.py [--n 8] [--repeats 3] [--device cpu|cuda] [--out F]
                                        [-- hydra overrides, e.g. task.output_len=44]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="trajectories (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from hydra import compose, initialize_config_module

    from smclm.build import build_world
    from smclm.methods.gfn import _prefix_log_phi
    from smclm.smc.sampler import run_smc
    from smclm.tasks.latent import LatentPotential

    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=gfn_arithmetic", f"device={args.device}", *overrides],
        )
    world = build_world(cfg)
    task = world.task
    stopping = task.stopping
    gen = torch.Generator(device=world.model.device).manual_seed(args.seed)
    with torch.no_grad():
        res = run_smc(world.model, task.prompt_ids, task.output_len, task.bind(None), args.n,
                      ess_threshold=0.0, proposal="p0", generator=gen)  # fmt: skip
    tokens, lengths = res.tokens, res.lengths
    forced = task.tool.forced_targets(tokens) if task.tool is not None else None
    state = torch.arange(tokens.shape[1], device=tokens.device)[None]
    terminable = (state < lengths[:, None]) & (state + 1 >= stopping.min_len)
    if forced is not None:
        terminable = terminable & (forced < 0)
    stops = list(stopping.stop_ids)
    one_pass = task.potential.prefix_log_phi
    dev = world.model.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def fast() -> torch.Tensor:
        return one_pass(tokens, terminable, stops)

    def per_prefix() -> torch.Tensor:
        saved = LatentPotential.prefix_log_phi
        LatentPotential.prefix_log_phi = lambda *a: None  # type: ignore[method-assign]
        try:
            return _prefix_log_phi(task, tokens, terminable, None)
        finally:
            LatentPotential.prefix_log_phi = saved  # type: ignore[method-assign]

    def timed(fn) -> tuple[float, torch.Tensor]:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn()
        sync()
        return time.perf_counter() - t0, out

    _, a = timed(fast)
    _, b = timed(per_prefix)
    times: dict[str, list[float]] = {"one_pass_s": [], "per_prefix_s": []}
    for _ in range(args.repeats):
        times["one_pass_s"].append(timed(fast)[0])
        times["per_prefix_s"].append(timed(per_prefix)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "prefix_rewards_speedup": med["per_prefix_s"] / med["one_pass_s"],
        "max_abs_diff": float((a - b).abs().max()),
        "one_pass_s": med["one_pass_s"],
        "per_prefix_s": med["per_prefix_s"],
        "raw": times,
        "n": args.n,
        "states": int(terminable.sum()),
        "lengths": lengths.tolist(),
        "output_len": task.output_len,
        "reward_context_tokens": int(task.potential.row.context.numel()),
        "device": str(dev),
        "model": str(cfg.model.name),
        "overrides": overrides,
        "load_1min": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }
    for key in ("prefix_rewards_speedup", "max_abs_diff", "one_pass_s", "per_prefix_s", "states"):
        print(f"{key}: {out[key]:.4g}" if isinstance(out[key], float) else f"{key}: {out[key]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
