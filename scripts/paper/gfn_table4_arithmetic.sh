#!/usr/bin/env bash
# Table 4 of Hu et al. (ICLR 2024, "Amortizing intractable inference in large language models"):
# integer arithmetic, the accuracy of each method's majority-vote answer on 3-, 4- (in
# distribution) and 5-operand (out of distribution) questions, experiment=gfn_arithmetic
# (../shared/docs/gfn-paper-spec.md §4; task=latent over smclm's generated arithmetic data, no
# download). Runs:
#   * GFlowNet fine-tuning (method=gfn: modified SubTB, LoRA policy, replay buffer seeded with the
#     labelled rationales, reward temperature 1.1 → 0.5), SFT on the labelled rationales
#     (method=sft) and PPO with the same reward (method=ppo): the paper's rows;
#   * twisted SMC with CTL twists (method=ctl): ours, beyond the paper;
#   * k-shot prompting of the base model (`smclm eval` with evaluator.sampler=p0 task.k_shot=k):
#     rows p0_<k>shot; the paper's k-shot numbers were not recovered, so no paper column.
# Every run is evaluated on one test file that holds the 3-, 4- and 5-operand test sets
# interleaved (data/arithmetic_test_345.jsonl in the results directory, seed task.data_seed), so
# that each evaluation scores all three (arith/acc_3op, _4op, _5op) and the first n rows
# (evaluator.n_prompts) hold n/3 of each. Where a profile's final evaluation reads more rows than
# the in-training ones (FINAL_PROMPTS below), every trained run is evaluated once more after
# training (smclm eval run=…, into its eval/, whose numbers the table then shows); the k-shot
# rows read the same rows. report.md: accuracy (%) per operand count and method, mean ± 95% CI
# over seeds, beside the paper's confirmed numbers (smclm/report/paper_results.yaml, gfn_table4;
# its ± values are unverified and left out); then the same at equal compute (`smclm table --at
# time/total_update_s=B`, B the smallest total update time of the GFlowNet, PPO and CTL runs:
# each run at its last in-training evaluation within B; wall time compares runs made on one
# machine, one after another).
#
#   scripts/paper/gfn_table4_arithmetic.sh [--profile paper|cpu|smoke] [--launcher slurm|local]
#                                          [--out DIR] [hydra overrides]
#
# Profiles (the reductions from the paper's settings, recorded in each run and in the report):
#   paper  GPT-J 6B (model.name=nlpcloud/instruct-gpt-j-fp16, bf16 on a GPU), seeds 0–4, 2000
#          updates of 16 trajectories of one question (the paper accumulates 32 questions per
#          step: smclm takes one per update), in-training evaluation every 50 updates on the
#          first 150 test rows (50 per operand count), the final one on all 1500 (500 each);
#          k ∈ {0, 3, 5, 10, 20}. UNVERIFIED: the number of seeds behind the paper's table; SFT's
#          and PPO's settings (not in the paper's code: the GFlowNet's LoRA and lr here).
#          Differs: T = 30 tokens with the calculator's (smclm counts them) for training and
#          evaluation alike: the paper's evaluation length (22 policy tokens + ≤ 8 of the tool),
#          looser than its training cap (18 policy tokens, the tool's not counted, so no one T
#          of smclm's is that cap; `smclm eval run=… output_len=N` could evaluate at another T).
#   cpu    SmolLM2-135M offline (the experiment's model): measured 38 min on 2 cores with
#          native bfloat16 (model.dtype=auto) at commit 7237f90, 2 h 11 min in float32 on 2
#          loaded cores (load ~3) at 69d1b85, before GFlowNet's one-pass prefix rewards
#          (docs/results/gfn_table4_smollm2_cpu.md): seeds 0, 1; 16 updates of 8 trajectories, evaluated after 0 and 16
#          updates on the first 15 test rows (5 per operand count; no separate final
#          evaluation); τ_R's horizon 8 updates; task.output_len=44 (SmolLM2 writes every digit
#          and blank as a token of its own: a 5-operand rationale with the tool's numbers takes
#          up to 43); GFlowNet's lr warm-up 2 updates (the paper's 20 is longer than the run);
#          the CTL twist's lr 1e-3 (to move in so few updates, as the other cpu profiles; the
#          LoRA policies keep the paper's 1e-4: at 1e-3 SFT and PPO wrote junk within 2–16
#          updates); k ∈ {0, 3}. Median seconds per update in the bfloat16 run: GFlowNet 14–15,
#          PPO 18–20, SFT 5–6, CTL 4–7 (in float32 before the one-pass prefix rewards: GFlowNet
#          51–62, PPO 30–34, SFT 7, CTL 10–16).
#   smoke  seconds, for tests (with tiny models passed as overrides): 2 updates, 4 trajectories,
#          T = 12, 3 samples on 3 (final: 6) test rows, k ∈ {0, 3}.
RESULT=gfn_table4
EXPERIMENT=gfn_arithmetic
METHODS=gfn,sft,ppo,ctl
PAPER=(seed=0,1,2,3,4 model.name=nlpcloud/instruct-gpt-j-fp16 evaluator.n_prompts=150)
CPU=(seed=0,1 train.updates=16 train.eval_every=16 smc.n_particles=8 task.output_len=44
  evaluator.n_prompts=15 train.progress=false)
SMOKE=(seed=0 train.updates=2 train.eval_every=2 smc.n_particles=4 task.output_len=12
  evaluator.n_samples=3 evaluator.n_prompts=3 train.progress=false)
declare -A KSHOTS=([paper]="0 3 5 10 20" [cpu]="0 3" [smoke]="0 3")
# test rows of the final evaluation (null: all); empty: none after training, the last
# in-training evaluation is the final one (and the k-shot rows read evaluator.n_prompts rows)
declare -A FINAL_PROMPTS=([paper]=null [cpu]="" [smoke]=6)
declare -A HORIZON=([paper]=150 [cpu]=8 [smoke]=2)  # GFlowNet's τ_R 1.1 → 0.5 over H updates
declare -A WARMUP=([paper]=20 [cpu]=2 [smoke]=20)  # GFlowNet's linear lr warm-up (updates)
declare -A TWIST_LR=([paper]=1e-4 [cpu]=1e-3 [smoke]=1e-4)  # CTL's twist
source "$(dirname "$0")/_common.sh"

# Python with smclm importable: smclm's own interpreter (its entry point's #! line), else the
# repository's virtual environment, else python3
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in "$(sed -n '1s/^#![[:space:]]*//p' "$SMCLM" 2>/dev/null)" \
    "$ROOT/.venv/bin/python" python3; do
    if [[ -n "$candidate" ]] && $candidate -c 'import smclm' 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
[[ -n "$PYTHON" ]] || die "no Python that imports smclm; set PYTHON=... (e.g. .venv/bin/python)"

# The test rows: the 3-, 4- and 5-operand test sets of seed task.data_seed, interleaved
matching '^[+~]*task\.data_seed='
DATA_SEED=0
((${#MATCHED[@]} == 0)) || DATA_SEED="${MATCHED[-1]#*=}"
TEST="$OUT/data/arithmetic_test_345.jsonl"
$PYTHON - "$TEST" "$DATA_SEED" <<'EOF' || die "could not write the test rows to $TEST"
import sys

from smclm.tasks.arithmetic_data import generate, write_jsonl

test = generate(seed=int(sys.argv[2])).test
write_jsonl(sys.argv[1], [row for trio in zip(test[3], test[4], test[5]) for row in trio])
EOF
DATA=("task.test_data=$TEST")

sweep gfn "method=$(pick gfn)" "${DATA[@]}" "method.tau_r_updates=${HORIZON[$PROFILE]}" \
  "method.warmup=${WARMUP[$PROFILE]}"
sweep policies "method=$(pick sft,ppo)" "${DATA[@]}"
sweep ctl "method=$(pick ctl)" "${DATA[@]}" "method.lr=${TWIST_LR[$PROFILE]}"

# Every trained run once more, on the final test rows (into <run>/eval/; done ones are kept)
FINAL=()
[[ -z "${FINAL_PROMPTS[$PROFILE]}" ]] || FINAL=("evaluator.n_prompts=${FINAL_PROMPTS[$PROFILE]}")
matching '^[+~]*(evaluator|smc|device|threads)[.=]'  # what `smclm eval run=` takes
todo=()
while IFS= read -r summary; do
  run="$(dirname "$summary")"
  [[ -f "$run/eval/summary.json" ]] || todo+=("'${run//\'/\\\'}'")
done < <(find "$OUT/runs/gfn" "$OUT/runs/policies" "$OUT/runs/ctl" -name summary.json \
  -not -path '*/eval/*' 2>/dev/null | sort)
if ((${#FINAL[@]} && ${#todo[@]})); then
  echo "== $NAME ($PROFILE): the final evaluation of ${#todo[@]} trained run(s)"
  "$SMCLM" eval -m "run=$(IFS=,; echo "${todo[*]}")" evaluator=arithmetic "${MATCHED[@]}" \
    "${FINAL[@]}" "hydra.sweep.dir=$OUT/logs/final_eval"
fi

# k-shot prompting of p₀ on the same final rows, per seed
read -ra ks <<<"${KSHOTS[$PROFILE]}"
if [[ ! -f "$OUT/runs/kshot/.done" ]]; then
  matching '^[+~]*(model|task|smc|evaluator|device|threads|seed)[.=]'  # what eval takes
  echo "== $NAME ($PROFILE): k-shot prompting of p₀, k ∈ {${ks[*]}}"
  "$SMCLM" eval -m "experiment=$EXPERIMENT" method=none twist=none \
    evaluator.sampler=p0 "task.k_shot=$(IFS=,; echo "${ks[*]}")" "${DATA[@]}" "${MATCHED[@]}" \
    "${FINAL[@]}" "${RECORD[@]}" "hydra.sweep.dir=$OUT/runs/kshot" \
    'hydra.sweep.subdir=k${task.k_shot}_seed${seed}'
  touch "$OUT/runs/kshot/.done"
fi

report

# The same table at equal compute: the smallest total update time B of the GFlowNet, PPO and CTL
# runs, raised to the latest first evaluation (GFlowNet's set-up, its pilot batch and buffer
# seeding, counts before update 0), so that every run has an evaluation within B
BUDGET="$($PYTHON - "$OUT/runs" <<'EOF'
import json
import sys
from pathlib import Path

finals, firsts = [], []
for path in Path(sys.argv[1]).glob("*/*/summary.json"):
    summary = json.loads(path.read_text())
    if summary.get("run/method") not in ("gfn", "ppo", "ctl"):
        continue
    if "time/total_update_s" in summary:
        finals.append(float(summary["time/total_update_s"]))
    metrics = path.parent / "metrics.jsonl"
    text = metrics.read_text() if metrics.is_file() else ""
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    first = next((r for r in rows if "time/eval_s" in r and "time/total_update_s" in r), None)
    if first is not None:
        firsts.append(float(first["time/total_update_s"]))
print(repr(max([min(finals), *firsts])) if finals else "")  # exact: no rounding down
EOF
)"
if [[ -n "$BUDGET" ]]; then
  (cd "$OUT" && "$SMCLM" table . --paper "$RESULT" --at "time/total_update_s=$BUDGET" \
    --out at_equal_compute) >/dev/null
fi
{
  echo
  echo "## At equal compute"
  echo
  if [[ -n "$BUDGET" ]]; then
    echo "Each trained run at its last in-training evaluation (on the in-training test rows) whose"
    echo "total update time is ≤ $BUDGET s: the smallest total of the GFlowNet, PPO and CTL runs, or"
    echo "the latest first evaluation if later (GFlowNet's set-up counts before update 0)"
    echo "(at_equal_compute/table.md; the k-shot rows have no training: left out). Wall time"
    echo "compares runs made on one machine, one after another."
    echo
    sed -n '/^| method/,/^$/p' "$OUT/at_equal_compute/table.md"
  else
    echo "No GFlowNet, PPO or CTL run: no budget to compare at."
  fi
  echo
  echo "## Test rows"
  echo
  echo "data/arithmetic_test_345.jsonl: the 3-, 4- and 5-operand test sets of seed $DATA_SEED"
  echo "(500 each, interleaved); in-training evaluations read its first evaluator.n_prompts rows,"
  if ((${#FINAL[@]})); then
    echo "the final evaluation and the k-shot rows its first ${FINAL_PROMPTS[$PROFILE]} (null: all)."
  else
    echo "the k-shot rows the same (no separate final evaluation in this profile)."
  fi
  config="$(find "$OUT/runs" -name config.yaml -path '*seed*' -not -path '*/eval/*' | head -1)"
  if [[ -n "$config" ]] && grep -q '^  calculator: true' "$config"; then
    echo "Calculator: on (task.calculator=true, at most task.calculator_terms operands)."
  else
    echo "Calculator: off (task.calculator=false): the policy writes every number itself."
  fi
} >>"$OUT/report.md"
