#!/usr/bin/env bash
# Table 3 of Zhao et al. (ICML 2024): sentiment, log φ = log p(1 star | s) with gpt2-medium and
# T = 10 (experiment=sentiment). CTL, RL, SIXO, FUDGE, DPG and PPO, KL(q‖σ) and KL(σ‖q) beside
# the paper's numbers, in one results directory (report.md, table.md/csv, plots).
#
#   scripts/paper/table3_sentiment.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                     [--out DIR] [hydra overrides]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  the paper's: 2048 updates (exponential schedule) of 100 particles, eval K = 32, 500,
#          2000 exact samples, seeds 0-4 (one GPU)
#   cpu    about an hour on 2 CPU cores (estimated, not measured; gpt2-medium is 355M
#          parameters): 2 seeds, 8 updates of 16 particles, eval K = 8, 16, 64 exact samples
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=table3
EXPERIMENT=sentiment
METHODS=ctl,rl,sixo,fudge,dpg,ppo
PAPER=(seed=0,1,2,3,4)
CPU=(seed=0,1 train.updates=8 smc.n_particles=16 "evaluator.particles=[8,16]" exact_samples.n=64
  exact_samples.batch_size=512)
SMOKE=(seed=0 train.updates=2 smc.n_particles=4 "evaluator.particles=[4]" evaluator.n_exact=2
  exact_samples.n=8 train.progress=false)
source "$(dirname "$0")/_common.sh"

sweep all "method=$METHODS"
report
