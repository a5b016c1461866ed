#!/usr/bin/env bash
# Figure-3-style bounds vs K and KL curves on SmolLM2, a word-list threshold (ours, not the paper's).
# experiment=word_threshold: SmolLM2-135M offline, prompt "I think my neighbour is", T = 8 tokens,
# log φ = log(1[the continuation contains a word of smclm.tasks.scorers.NEGATIVE_WORDS] + ε)
# (task=text_scorer, word_count, no classifier), p₀'s acceptance rate ≈ 2.7%. It trains CTL, RL,
# SIXO, FUDGE, DPG and PPO (an MLP head on the frozen body each, lr 1e-3), plots KL(q‖σ) and
# KL(σ‖q) against updates (kl_curves.png), then evaluates every trained run once more at each K for
# the twisted proposal and for p₀ (SIS and SMC, lower and upper bounds: log_z_bounds.png, as
# fig3_toxicity_threshold.sh does for CTL). No paper numbers (RESULT=none).
#
#   scripts/paper/fig3_word_threshold.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                        [--out DIR] [hydra overrides]
#
# Profiles (recorded in each run and in the report):
#   paper  not a paper setting (the paper has no such task): the experiment config as it stands,
#          200 updates of 32 particles, bounds at K = 32 every 50 updates on 8 exact samples of a
#          pool of 64; then the bounds at K = 1, 4, 16, 64, 256 on 8 exact samples. Hours on a CPU
#   cpu    about 30 min on 2 idle CPU cores (estimated from per-update times; measured: 45 min
#          34 s at load average 3.5 with other jobs, docs/results/word_threshold_smollm2_cpu.md),
#          one thread per run: 30 updates of 32 particles, evaluations after 0, 15 and 30
#          updates at K = 16 on 4 exact samples (the twisted proposal only: p₀'s does not
#          change), G_q on a pool of 64; then the bounds at K = 1, 4, 16, 64 on 2 exact samples
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=none
EXPERIMENT=word_threshold
METHODS=ctl,rl,sixo,fudge,dpg,ppo
PAPER=(seed=0)
CPU=(seed=0 threads=1 train.updates=30 train.eval_every=15 "evaluator.particles=[16]"
  evaluator.n_exact=4 "evaluator.proposals=[twist]" exact_samples.n=64)
SMOKE=(seed=0 train.updates=2 train.eval_every=1 smc.n_particles=4 "evaluator.particles=[4]"
  evaluator.n_exact=2 exact_samples.n=4 exact_samples.batch_size=64 train.progress=false)
declare -A BOUNDS_K=([paper]="[1,4,16,64,256]" [cpu]="[1,4,16,64]" [smoke]="[1,4]")
declare -A BOUNDS_N=([paper]=8 [cpu]=2 [smoke]=2)
source "$(dirname "$0")/_common.sh"

sweep all "method=$METHODS"
# the bounds against K for both proposals: one more evaluation of each trained run (<run>/eval/)
matching '^[+~]*(model|task|twist|smc|exact_samples|device|threads)[.=]'  # what eval takes
for run in "$OUT"/runs/all/*/; do
  [[ -f "$run/summary.json" ]] || continue
  echo "== $NAME ($PROFILE): bounds against K for $(basename "$run")"
  "$SMCLM" eval "run=${run%/}" "experiment=$EXPERIMENT" "${MATCHED[@]}" evaluator=bounds \
    "evaluator.particles=${BOUNDS_K[$PROFILE]}" "evaluator.n_exact=${BOUNDS_N[$PROFILE]}" \
    "evaluator.proposals=[twist,p0]" "hydra.run.dir=${run%/}/eval"
done
report
{
  echo
  echo "## p₀'s acceptance rate"
  echo
  echo "Rejection sampling from p₀ (the exact target samples) accepts a draw exactly when its"
  echo "continuation contains a listed word, so its rate estimates Z = P_p₀(hit) (+ ε), an"
  echo "independent check on the log-Z bounds; the runs' logs say (empty: the pool came from the cache):"
  echo
  echo '```'
  grep -h "rejection sampling:" "$OUT"/runs/all/*/smclm.log 2>/dev/null | sed 's/^.*rejection/rejection/' || true
  echo '```'
} >>"$OUT/report.md"
