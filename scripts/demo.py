"""The offline demo: exact log Z on the toy world next to SIS and SMC estimates.

For several particle counts N, with the untrained twist (ψ ≡ 1, i.e. the proposal is p₀) and
with the exact optimal twist ψ*, it prints the mean and spread of log Ẑ over repeated runs.
Lower bounds sit below log Z; ψ* gives log Ẑ = log Z with zero variance (paper Prop. A.2).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscription

from smclm.evaluators.exact import exact_metrics, solve  # noqa: E402
from smclm.models.toy import build_toy_world, encode_toy_prompt  # noqa: E402
from smclm.models.twisted_lm import TwistedLM  # noqa: E402
from smclm.smc.sampler import run_smc  # noqa: E402
from smclm.tasks.toy import build_toy_task  # noqa: E402

REPEATS = 20


def main() -> None:
    t0 = time.perf_counter()
    base, tok = build_toy_world(vocab_size=12, seed=0)
    prompt = torch.tensor(encode_toy_prompt(tok, "the"))
    task = build_toy_task(prompt, 5, "threshold", [tok.get_vocab()["bad"]], 12, min_count=2)
    untrained = TwistedLM(base, None)
    sol = solve(untrained, task)
    optimal = untrained.with_twist(sol.optimal_twist())
    print("toy world: GPT-Neo, V=12, prompt 'the', T=5, target: at least 2 x 'bad'")
    print(f"exact log Z = {sol.log_z:.4f}   (P(target) = {torch.tensor(sol.log_z).exp():.2e})")
    m = exact_metrics(untrained, task, sol)
    print(
        f"exact KL(q||sigma) = {m['kl/q_sigma_exact']:.3f}, KL(sigma||q) = "
        f"{m['kl/sigma_q_exact']:.3f} for the untrained proposal q = p0\n"
    )
    gen = torch.Generator().manual_seed(0)
    header = (
        f"{'twist':10s} {'sampler':6s} {'N':>5s} {'mean log Z-hat':>15s} {'sd':>8s} {'log Z':>9s}"
    )
    print(header)
    print("-" * len(header))
    for name, model in (("untrained", untrained), ("optimal", optimal)):
        for sampler, thr in (("SIS", 0.0), ("SMC", 1.0)):
            for n in (4, 16, 64, 256, 1024):
                z = run_smc(  # the REPEATS independent runs as one batch of runs
                    model,
                    prompt,
                    task.output_len,
                    task.bind(),
                    n,
                    ess_threshold=thr,
                    generator=gen,
                    n_runs=REPEATS,
                ).log_z_hats
                print(
                    f"{name:10s} {sampler:6s} {n:5d} {z.mean():15.4f} {z.std():8.4f} "
                    f"{sol.log_z:9.4f}"
                )
    print(f"\n({REPEATS} runs per row; {time.perf_counter() - t0:.1f} s)")
    print("Next: smclm train experiment=toy_ctl   (trains twists; see README)")


if __name__ == "__main__":
    main()
