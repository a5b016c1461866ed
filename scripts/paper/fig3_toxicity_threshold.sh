#!/usr/bin/env bash
# Figure 3 of Zhao et al. (ICML 2024): log-Z bounds against the number of particles K on the
# toxicity threshold task (experiment=toxicity_threshold), for the twisted proposal q and for p₀:
# SIS and SMC, lower and upper bounds, after CTL training. The paper gives no numbers for it, so
# the report is the plot log_z_bounds.png (and the KL table of the trained CTL run).
#
#   scripts/paper/fig3_toxicity_threshold.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                            [--out DIR] [hydra overrides]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  the paper's: CTL, seed 1, 5000 updates of 100 particles, 100 exact samples; then the
#          bounds at K = 1, 4, 8, 16, 32, 128, 512, 2048, each the mean over 20 exact samples
#   cpu    about an hour on 2 CPU cores (estimated): 200 updates of 32 particles, 20 exact samples
#          (rejection sampling from p₀ at about 1 in 10⁴ is most of the cost); K up to 512, 10
#          exact samples per point
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=fig3
EXPERIMENT=toxicity_threshold
METHODS=ctl
PAPER=(seed=1)
CPU=(seed=1 train.updates=200 train.eval_every=50 smc.n_particles=32 "evaluator.particles=[32]"
  exact_samples.n=20)
SMOKE=(seed=1 train.updates=2 train.eval_every=1 smc.n_particles=4 "evaluator.particles=[4]"
  evaluator.n_exact=2 exact_samples.n=4 train.progress=false)
declare -A FIG3_K=([paper]="[1,4,8,16,32,128,512,2048]" [cpu]="[1,4,8,16,32,128,512]" [smoke]="[1,4,8]")
declare -A FIG3_N=([paper]=20 [cpu]=10 [smoke]=2)
source "$(dirname "$0")/_common.sh"

sweep all "method=$METHODS"
# Figure 3's bounds: one more evaluation of each trained run at every K (into <run>/eval/)
matching '^[+~]*(model|task|twist|smc|exact_samples|device|threads)[.=]'  # what eval takes
for run in "$OUT"/runs/all/*/; do
  "$SMCLM" eval "run=${run%/}" "experiment=$EXPERIMENT" "${MATCHED[@]}" evaluator=bounds \
    "evaluator.particles=${FIG3_K[$PROFILE]}" "evaluator.n_exact=${FIG3_N[$PROFILE]}" \
    "hydra.run.dir=${run%/}/eval"
done
report
