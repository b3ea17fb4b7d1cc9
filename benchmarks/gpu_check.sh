#!/usr/bin/env bash
# The method's GPU figures and a CUDA trial, as one prepared script (benchmarks/README.md, "gpu_check").
#
#   bash benchmarks/gpu_check.sh            # on one GPU (H200: <= 8 min): bases, optimizer step, CUDA trial
#   bash benchmarks/gpu_check.sh --cpu      # the same code paths at toy sizes (< 60 s on 2 CPU cores)
#
# Environment:
#   OUT                 where everything goes (default runs/gpu_check): gpu_check.json (all figures),
#                       gpu_check.md (the tables), gpu_check.log (everything printed), one JSON per section
#   RPSFT_GPU_CHECK     gpu (default) or cpu (= --cpu)
#   RPSFT_WHEELS        wheel directory from `python benchmarks/gpu_check.py prepare` (default
#                       benchmarks/wheels): installed with `pip install --no-index --find-links` when it
#                       exists, else the packages already installed are used
#   RPSFT_GPU_CHECK_BUDGET_S   overall time budget in seconds (default 465 on a GPU, 300 on a CPU)
#   RPSFT_GPU_CHECK_WORK       scratch directory (model files; default: a temporary directory, removed)
#   RPSFT_GPU_CHECK_EXACT_ALL  on | auto (default on a GPU: when it fits the budget) | off: exact SVD on all
#                       224 matrices, else its total is extrapolated from one matrix per shape
#   RPSFT_GPU_CHECK_STEP_ARGS  extra bench_step.py arguments, e.g. "--grad-checkpointing"
#   PYTHON              interpreter (default .venv/bin/python if present, else python)
# Exit status: 0 when every section ran and every check passed; 1 otherwise (the figures are written anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

MODE=${RPSFT_GPU_CHECK:-gpu}
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --cpu or --gpu)" >&2; exit 2 ;;
  esac
done
case "$MODE" in gpu | cpu) ;; *) echo "RPSFT_GPU_CHECK must be gpu or cpu, got $MODE" >&2; exit 2 ;; esac

OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/*.rc
REMOVE_WORK=
if [ -n "${RPSFT_GPU_CHECK_WORK:-}" ]; then
  WORK=$RPSFT_GPU_CHECK_WORK
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/rpsft-gpu-check.XXXXXX")
  REMOVE_WORK=1
fi
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
finish() {
  local rc=$?
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true # the log is complete when the script returns
  if [ -n "$REMOVE_WORK" ]; then rm -rf "$WORK"; fi
  exit "$rc"
}
trap finish EXIT

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python || command -v python3); fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# toy sizes: one thread per process (OpenMP pools on a small, shared CPU cost more than they give)
[ "$MODE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
START=$SECONDS
if [ "$MODE" = gpu ]; then BUDGET=${RPSFT_GPU_CHECK_BUDGET_S:-465}; else BUDGET=${RPSFT_GPU_CHECK_BUDGET_S:-300}; fi
echo "# gpu_check: mode $MODE, python $PYTHON, out $OUT, budget ${BUDGET}s, $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# The project's pure-Python dependencies the GPU machine lacks (pydantic, ...), from prepared wheels.
WHEELS=${RPSFT_WHEELS:-benchmarks/wheels}
if [ -d "$WHEELS" ]; then
  WHEELS=$(cd "$WHEELS" && pwd)
  export RPSFT_WHEELS=$WHEELS
  reqs=(pydantic)
  [ -f "$WHEELS/requirements.txt" ] && mapfile -t reqs < <(grep -v '^\s*\(#\|$\)' "$WHEELS/requirements.txt")
  echo "# installing ${reqs[*]} from $WHEELS (no index)"
  if ! "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" "${reqs[@]}"; then
    SITE="$WORK/site-packages"
    echo "# could not install into the environment; installing into $SITE (put first on PYTHONPATH)"
    if "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" "${reqs[@]}"; then
      export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    else
      echo "# wheel install failed: using what is installed"
    fi
  fi
else
  echo "# no wheel directory ($WHEELS): using the installed packages"
fi

# section NAME CAP_S: run one section in its own process, within its cap and what is left of the budget
section() {
  local name=$1 cap=$2 left limit rc=0
  left=$((BUDGET - (SECONDS - START) - 10))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "FAIL: section $name not started: the time budget is spent"
    echo 125 >"$OUT/$name.rc"
    return 0
  fi
  echo
  echo "=============== $name (limit ${limit}s, elapsed $((SECONDS - START))s) ==============="
  if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=20 "$limit" "$PYTHON" benchmarks/gpu_check.py "$name" --mode "$MODE" --out "$OUT" \
      --work "$WORK" --time-limit "$limit" || rc=$?
  else
    "$PYTHON" benchmarks/gpu_check.py "$name" --mode "$MODE" --out "$OUT" --work "$WORK" --time-limit "$limit" ||
      rc=$?
  fi
  echo "$rc" >"$OUT/$name.rc"
  echo "# $name: exit $rc after $((SECONDS - START))s"
}

# The CUDA trial first, the bases last: that section fits what is left (it times fewer matrices when short).
section preflight 60
section train 150
section step 200
section bases 400

export RPSFT_GPU_CHECK_ELAPSED=$((SECONDS - START))
rc=0
"$PYTHON" benchmarks/gpu_check.py report --mode "$MODE" --out "$OUT" || rc=$?
echo "# gpu_check: exit $rc after $((SECONDS - START))s; results in $OUT"
exit "$rc"
