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
#   cpu    measured: 11 min 35 s on 2 idle CPU cores with model=smollm2 (SmolLM2-135M: the
#          separate twist is a trainable 135M-parameter copy; docs/results/table8_smollm2_cpu.md;
#          too few updates to move q): 2 seeds, 6 updates (evaluations after 0, 2, 4, 6) of 10
#          rows (CTL 1 o × 10), eval K = 8 on 2 o's with the twisted proposal only, G_q on 32 of 64 exact pairs
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=table8
EXPERIMENT=infilling_2
METHODS=ctl,rl,sixo,fudge,dpg,ppo
PAPER=(seed=0,1,2,3,4)
CPU=(seed=0,1 train.updates=6 smc.n_particles=10 "evaluator.particles=[8]" evaluator.n_exact=2
  "evaluator.proposals=[twist]" evaluator.n_g_q=32 exact_samples.n=64)
SMOKE=(seed=0 train.updates=2 smc.n_particles=10 "evaluator.particles=[4]" evaluator.n_exact=2
  exact_samples.n=8 train.progress=false)
source "$(dirname "$0")/_common.sh"

sweep all "method=$METHODS"
report
