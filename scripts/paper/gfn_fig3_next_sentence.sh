#!/usr/bin/env bash
# Figure 3 of Hu et al. (ICLR 2024, "Amortizing intractable inference in large language models"):
# sentence continuation, the diversity of each test prompt's samples (x) against their max
# log-likelihood (y), experiment=gfn_next_sentence (../shared/docs/gfn-paper-spec.md §1). Runs:
#   * GFlowNet (method=gfn: modified SubTB, LoRA policy, the paper's exploration mixture) for each
#     τ of the profile, targeting σ ∝ p̃₀(Z "." | X)^{1/τ} (task.tau=τ) with the paper's linear
#     reward-temperature curriculum as GFlowNet's own schedule: method.tau_r_start=1/τ,
#     tau_r_end=1 over tau_r_updates=H updates (the effective temperature τ·τ_R goes from 1 to τ);
#   * twisted SMC with CTL twists (method=ctl) at the same τ's: ours, beyond the paper;
#   * one `smclm eval` of p₀ with the generate baselines on the same test prompts: beam, diverse
#     beam (unavailable offline: logged as skipped), nucleus, sampling at T = 1 and at each τ,
#     greedy;
#   * per τ, a reference for σ itself (beyond the paper): importance resampling from p₀ (SIS with
#     K particles, an untrained twist ψ ≡ 1, weights φ = p̃₀^{1/τ−1}, n draws by weight;
#     `p0_sir_K<K>` in the table and figure): approximate samples of σ, biased for small K.
# The paper gives Figure 3 as a plot only: there are no numbers to compare; see fig3_sentences.png
# (and table.md, a plain table without KLs).
#
#   scripts/paper/gfn_fig3_next_sentence.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                           [--out DIR] [hydra overrides]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  gpt2-xl, seed 27, lr 1e-4 (20-update warm-up), 8 trajectories of one prompt per update,
#          τ ∈ {0.8, 0.85, 0.9, 0.95}, curriculum horizon H = 750, 8 samples per test prompt.
#          UNVERIFIED: which τ's Figure 3 shows; 1500 updates (the paper: ≤ 300 epochs with early
#          stopping, 32 prompts × 8 per optimiser step; smclm takes one prompt per update). For the
#          paper's prompts add task.prompts=<its prompts.txt> task.n_train=950 task.n_test=50
#          (default: smclm's built-in 50/10 prompts)
#   cpu    SmolLM2-135M offline, ≈ 50 min on 2 idle cores: τ ∈ {0.8, 0.9}, 60 updates, H = 30, the
#          LoRA policy's and CTL twist's lr 1e-3 (chosen to move in 60 updates; 1e-4 not tried),
#          8 samples on 5 test prompts (docs/results/gfn_fig3_smollm2_cpu.md)
#   smoke  seconds, for tests (with tiny models passed as overrides)
RESULT=none
EXPERIMENT=gfn_next_sentence
METHODS=gfn,ctl
PAPER=(seed=27 model.name=gpt2-xl)
CPU=(seed=0 train.updates=60 train.eval_every=30 evaluator.n_prompts=5)
SMOKE=(seed=0 train.updates=2 train.eval_every=2 smc.n_particles=4 task.output_len=8
  evaluator.n_samples=3 evaluator.n_prompts=2 train.progress=false)
declare -A TAUS=([paper]="0.8 0.85 0.9 0.95" [cpu]="0.8 0.9" [smoke]="0.9")
declare -A HORIZON=([paper]=750 [cpu]=30 [smoke]=2)
declare -A SIR_K=([paper]=1024 [cpu]=512 [smoke]=16)  # particles of the σ reference
declare -A LR=([paper]=1e-4 [cpu]=1e-3 [smoke]=1e-4)  # GFN's policy and CTL's twist
source "$(dirname "$0")/_common.sh"

read -ra taus <<<"${TAUS[$PROFILE]}"
for tau in "${taus[@]}"; do
  inverse="$(awk -v t="$tau" 'BEGIN { printf "%.10g", 1 / t }')"
  sweep "gfn_tau$tau" "method=$(pick gfn)" "task.tau=$tau" "method.tau_r_start=$inverse" \
    method.tau_r_end=1 "method.tau_r_updates=${HORIZON[$PROFILE]}" "method.lr=${LR[$PROFILE]}"
done
listed="$(IFS=,; echo "${taus[*]}")"
sweep ctl "method=$(pick ctl)" "task.tau=$listed" "method.lr=${LR[$PROFILE]}"
# p₀ and the generate baselines on the same test prompts: one evaluation without a run
matching '^[+~]*(model|task|smc|evaluator|device|threads|seed)[.=]'  # what eval takes
echo "== $NAME ($PROFILE): p₀ and the generate baselines"
"$SMCLM" eval task=next_sentence evaluator=sentences twist=none "${MATCHED[@]}" "${RECORD[@]}" \
  "evaluator.baselines=[beam,diverse_beam,nucleus,sample,sample_tempered,greedy]" \
  "evaluator.tau=[$listed]" "hydra.run.dir=$OUT/runs/baselines"
# A reference for where σ itself lies: importance resampling from p₀ (an untrained twist is
# ψ ≡ 1, so twisted SIS proposes p₀ and weighs by φ = p̃₀^{1/τ−1}; n draws from K particles)
for tau in "${taus[@]}"; do
  echo "== $NAME ($PROFILE): p₀ importance resampling at τ = $tau (K = ${SIR_K[$PROFILE]})"
  "$SMCLM" eval task=next_sentence evaluator=sentences twist=mlp "${MATCHED[@]}" "${RECORD[@]}" \
    "task.tau=$tau" evaluator.sampler=twisted_smc "smc.n_particles=${SIR_K[$PROFILE]}" \
    smc.ess_threshold=0 "hydra.run.dir=$OUT/runs/p0_sir_tau$tau"
done
report
{
  echo
  echo "## Figure 3"
  echo
  echo "fig3_sentences.png: diversity against max log-likelihood, one point per method and τ and per"
  echo "baseline (each run's sent/* metrics; the values are in each run's summary.json). The paper"
  echo "gives Figure 3 as a plot only: there are no paper numbers to compare with."
} >>"$OUT/report.md"
