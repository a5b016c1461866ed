#!/usr/bin/env bash
# Table 4 of Zhao et al. (ICML 2024): infilling with T = 15 tokens before c = 10 conditioning
# tokens (experiment=infilling_15). CTL, RL, SIXO, FUDGE, DPG and PPO, E_o KL(q‖σ) and
# E_o KL(σ‖q) beside the paper's numbers, in one results directory (report.md, table.md/csv, plots).
#
#   scripts/paper/table4_infilling15.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                       [--out DIR] [hydra overrides]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  the paper's: 5500 updates (evaluated every 500) of 100 rows, CTL 25 o × 4 particles,
#          eval K = 32, 500 on 4 o's, 2000 exact (s, o) pairs, seeds 0-4 (one GPU)
#   cpu    about an hour on 2 CPU cores (estimated, not measured): 2 seeds, 24 updates
#          (evaluated every 8) of 16 rows (CTL 4 o × 4), eval K = 8, 32, 200 exact pairs
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=table4
EXPERIMENT=infilling_15
METHODS=ctl,rl,sixo,fudge,dpg,ppo
PAPER=(seed=0,1,2,3,4)
CPU=(seed=0,1 train.updates=24 train.eval_every=8 smc.n_particles=16 "evaluator.particles=[8,32]"
  exact_samples.n=200)
SMOKE=(seed=0 train.updates=2 train.eval_every=1 smc.n_particles=4 "evaluator.particles=[4]"
  evaluator.n_exact=2 exact_samples.n=8 train.progress=false)
source "$(dirname "$0")/_common.sh"

sweep all "method=$METHODS"
report
