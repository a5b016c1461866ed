#!/usr/bin/env bash
# Table 8 of Zhao et al. (ICML 2024): infilling with T = 2 tokens before c = 1 conditioning token.
# CTL, RL, SIXO, FUDGE, DPG and PPO (experiment=infilling_2), E_o KL(q‖σ) and E_o KL(σ‖q) beside
# the paper's numbers, in one results directory (report.md, table.md/csv, kl_curves.png, ...).
#
#   scripts/paper/table8_infilling2.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                      [--out DIR] [hydra overrides, e.g. model=smollm2]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  the paper's: 8192 updates (exponential schedule) of 100 rows, CTL 10 o × 10 particles,
#          eval K = 32, 500 on 4 o's, 2000 exact (s, o) pairs, seeds 0-4 (one GPU)
#   cpu    SmolLM2 on 2 CPU cores (model=smollm2; docs/results/table8_smollm2_cpu.md has the
#          measured wall time and what the run shows): 2 seeds, 32 updates (exponential schedule:
#          evaluations after 0, 2, 4, 8, 16, 32) of 40 rows (CTL 4 o × 10) at 10× the paper's
#          learning rates (1e-3; PPO 3e-4), an MLP head on the frozen body scored against the
#          LM's output embeddings (twist=mlp twist.output=embedding: a CTL update costs 0.7× the
#          paper's V-wide output layer's and 0.2× separate_mlp's on SmolLM2 in bfloat16,
#          docs/results/bench_smollm2_head_rows_cpu.md) instead of a trainable 135M-parameter copy,
#          PPO's policy an MLP head (method.policy=mlp_head) instead of a copy of the body; eval
#          K = 8 on 8 o's with the twisted proposal only, G_q on 64 exact pairs
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=table8
EXPERIMENT=infilling_2
METHODS=ctl,rl,sixo,fudge,dpg,ppo
PAPER=(seed=0,1,2,3,4)
CPU=(seed=0,1 twist=mlp twist.output=embedding train.updates=32 smc.n_particles=40
  "evaluator.particles=[8]" evaluator.n_exact=8 "evaluator.proposals=[twist]" evaluator.n_g_q=64 exact_samples.n=64)
# the cpu profile's learning rates and PPO's policy (the twist learners have none), per sweep
CPU_TWIST=(method.lr=1e-3)
CPU_PPO=(method.lr=3e-4 method.policy=mlp_head)
SMOKE=(seed=0 train.updates=2 smc.n_particles=10 "evaluator.particles=[4]" evaluator.n_exact=2
  exact_samples.n=8 train.progress=false)
source "$(dirname "$0")/_common.sh"

if [[ "$PROFILE" == cpu ]]; then
  sweep all "method=$(pick ctl,rl,sixo,fudge,dpg)" "${CPU_TWIST[@]}"
  sweep ppo "method=$(pick ppo)" "${CPU_PPO[@]}"
else
  sweep all "method=$METHODS"
fi
report
