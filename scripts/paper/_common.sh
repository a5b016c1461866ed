# Shared by scripts/paper/*.sh (sourced, not run). A script sets, then sources this file:
#   RESULT       the paper result, a key of smclm/report/paper_results.yaml (e.g. table8), or none
#   EXPERIMENT   the experiment config its runs use (e.g. infilling_2)
#   METHODS      the paper's methods, comma-separated
#   PAPER CPU SMOKE   bash arrays of Hydra overrides for each profile (the reductions)
# and then calls `sweep NAME OVERRIDES...` per Hydra multirun and `report` at the end.
#
# Options (any other argument is a Hydra override for every run, e.g. model=smollm2):
#   --profile paper|cpu|smoke   paper (default): the paper's settings; cpu: about an hour on 2 CPU
#                               cores; smoke: seconds, for tests. Recorded in every run's config as
#                               paper.profile, with the reductions as paper.reductions.
#   --launcher slurm|local      slurm: hydra/launcher=slurm (configs/hydra/launcher/slurm.yaml);
#                               local: submitit's local executor (jobs as parallel subprocesses).
#                               Default: Hydra's basic launcher (one job after another, here).
#   --out DIR                   the results directory (default results/<script>/<profile>_<date>);
#                               running again with the same --out resumes unfinished runs.
# $OUT/report.md records the command line as given (shell-quoted, pasteable), the working
# directory, and `smclm --version`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SMCLM="${SMCLM:-$(command -v smclm || echo "$ROOT/.venv/bin/smclm")}"
NAME="$(basename "$0" .sh)"

die() {
  echo "$NAME: error: $*" >&2
  exit 2
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"  # the header
}

ARGV=("$@")  # the arguments as given, for report.md's command (before any is parsed or dropped)
PROFILE=paper
LAUNCHER=basic
OUT=""
EXTRA=()
while (($#)); do
  case "$1" in
    --profile) PROFILE="${2:-}"; shift 2 || die "--profile needs a value: paper, cpu or smoke" ;;
    --profile=*) PROFILE="${1#*=}"; shift ;;
    --launcher) LAUNCHER="${2:-}"; shift 2 || die "--launcher needs a value: slurm or local" ;;
    --launcher=*) LAUNCHER="${1#*=}"; shift ;;
    --out) OUT="${2:-}"; shift 2 || die "--out needs a directory" ;;
    --out=*) OUT="${1#*=}"; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1'; options: --profile paper|cpu|smoke, --launcher slurm|local, --out DIR" ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

case "$PROFILE" in
  paper) REDUCE=("${PAPER[@]}") ;;
  cpu) REDUCE=("${CPU[@]}") ;;
  smoke) REDUCE=("${SMOKE[@]}") ;;
  *) die "unknown profile '$PROFILE'; choose --profile paper, cpu or smoke" ;;
esac
case "$LAUNCHER" in
  basic) LAUNCH=() ;;
  slurm) LAUNCH=(hydra/launcher=slurm) ;;
  local) LAUNCH=(hydra/launcher=submitit_local) ;;
  *) die "unknown launcher '$LAUNCHER'; choose --launcher slurm or local (default: here, one job after another)" ;;
esac

# A `method=a,b` among the overrides picks the methods (each must have a row in the paper's table);
# any other override replaces a profile's value of the same key.
key_of() { local k="${1%%=*}"; echo "${k#"${k%%[!+~]*}"}"; }
KEEP=()
for arg in "${EXTRA[@]}"; do
  if [[ "$(key_of "$arg")" == method ]]; then METHODS="${arg#*=}"; else KEEP+=("$arg"); fi
done
EXTRA=("${KEEP[@]}")
[[ -x "$SMCLM" ]] || die "smclm not found; run make install (or put smclm on PATH, or set SMCLM=...)"
# RESULT=none: a result without numbers in paper_results.yaml (another paper's figure): no check
[[ "$RESULT" == none ]] || "$SMCLM" table --paper "$RESULT" --methods "$METHODS" >/dev/null
overridden() { local a; for a in "${EXTRA[@]}"; do [[ "$(key_of "$a")" == "$(key_of "$1")" ]] && return 0; done; return 1; }
KEEP=()
for arg in "${REDUCE[@]}"; do overridden "$arg" || KEEP+=("$arg"); done
REDUCE=("${KEEP[@]}")

if [[ -z "$OUT" ]]; then  # the default, shown in report.md's command as if given
  OUT="results/$NAME/${PROFILE}_$(date +%Y-%m-%d_%H-%M-%S)"
  ARGV+=(--out "$OUT")
  OUT_ADDED=1
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

hydra_list() {  # quote each argument as a Hydra string: ['a=1','b=[2,3]']
  local out="" a
  for a in "$@"; do a="${a//\\/\\\\}"; out+="'${a//\'/\\\'}',"; done
  echo "[${out%,}]"
}
RECORD=(
  "++paper.result=$RESULT"
  "++paper.profile=$PROFILE"
  "++paper.reductions=$(hydra_list "${REDUCE[@]}")"
  "++paper.overrides=$(hydra_list "${EXTRA[@]}")"
)

pick() {  # pick ctl,rl: those of the requested METHODS, comma-separated (empty when none)
  local m out=""
  for m in ${1//,/ }; do [[ ",$METHODS," == *",$m,"* ]] && out+="$m,"; done
  echo "${out%,}"
}

matching() {  # matching REGEX: the profile's and the extra overrides that match, into MATCHED
  MATCHED=()
  local a
  for a in "${REDUCE[@]}" "${EXTRA[@]}"; do [[ "$a" =~ $1 ]] && MATCHED+=("$a"); done
  return 0
}

shell_quote() {  # the arguments as one command line the shell reads back (as Python's shlex.join)
  local a q=()
  for a in "$@"; do
    if [[ -n "$a" && "$a" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then q+=("$a"); else q+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${q[*]}"
}

# report.md's command: this script and its arguments exactly as given, and the working directory
# (relative --out or model paths need it). The script's path as given when relative (./ added to a
# bare name, which the shell would look up in PATH); an absolute one becomes relative to a working
# directory in the repository. Only a working directory outside the repository is written whole.
START=$(date +%s)
HERE="$(pwd -P)"
ROOT_P="$(cd "$ROOT" && pwd -P)"
SCRIPT="$0"
[[ "$SCRIPT" == */* ]] || SCRIPT="./$SCRIPT"
if [[ "$HERE" == "$ROOT_P" ]]; then
  WHERE="the repository root"
  [[ "$SCRIPT" != /* ]] || SCRIPT="scripts/paper/$NAME.sh"
elif [[ "$HERE" == "$ROOT_P"/* ]]; then
  WHERE="\`${HERE#"$ROOT_P"/}\` in the repository"
  if [[ "$SCRIPT" == /* ]]; then
    SCRIPT="scripts/paper/$NAME.sh"
    rel="${HERE#"$ROOT_P"/}"
    while [[ -n "$rel" ]]; do SCRIPT="../$SCRIPT"; [[ "$rel" == */* ]] && rel="${rel#*/}" || rel=""; done
  fi
else
  WHERE="\`$HERE\` (outside the repository)"
fi
COMMAND="$(shell_quote "$SCRIPT" "${ARGV[@]}")"

sweep() {  # sweep NAME method=a,b [overrides...]: one Hydra multirun into $OUT/runs/NAME
  local dir="$OUT/runs/$1"; shift
  [[ "$1" == "method=" ]] && return 0  # none of this sweep's methods was requested
  echo "== $NAME ($PROFILE): sweep $dir"
  # resume=true: a requeued or re-run job continues from its checkpoint; a finished one is kept
  "$SMCLM" train -m "experiment=$EXPERIMENT" "$@" "${REDUCE[@]}" "${EXTRA[@]}" "${RECORD[@]}" \
    "${LAUNCH[@]}" resume=true "hydra.sweep.dir=$dir"
}

report() {  # the reproduction report (table.md, table.csv), plots and report.md in $OUT
  (cd "$OUT" && "$SMCLM" table . --paper "$RESULT")  # table.md records `smclm table . ...`
  "$SMCLM" plot "$OUT"
  local took=$(($(date +%s) - START)) version
  version="$("$SMCLM" --version 2>/dev/null)" || version="unknown"
  {
    cat "$OUT/table.md"
    echo
    echo "## How these numbers were made"
    echo
    echo "Command (the arguments as given${OUT_ADDED:+, and the --out directory it chose}), run from $WHERE:"
    echo
    echo '```'
    echo "$COMMAND"
    echo '```'
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); wall time: $((took / 60)) min $((took % 60)) s"
    local cpu gpu=""
    cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1)"
    command -v nvidia-smi >/dev/null && gpu=", GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
    echo "- machine: $(uname -sm), $(nproc) CPU cores${cpu:+ ($cpu)}$gpu"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- runs: $(find "$OUT/runs" -name summary.json -not -path '*/eval/*' | wc -l) run directories under runs/"
    echo
    echo "## Environment"
    echo
    echo '```'
    echo "$version"
    echo '```'
  } >"$OUT/report.md"
  echo "results in $OUT: report.md table.md table.csv $(cd "$OUT" && ls -1 ./*.png 2>/dev/null | sed 's|^\./||' | paste -sd ' ' -)"
}
