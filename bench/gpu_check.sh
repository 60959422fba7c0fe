#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine, run from a copy of the repository; no network. Its steps
# get GPU_CHECK_BUDGET_S = 450 s in all (each also has a limit of its own), so it ends within 8 minutes.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   bash bench/gpu_check.sh --dry-run    # on the CPU, in seconds: every step tiny, or what it would run
#
# Steps, each timed; a failing step does not stop the others (bench/gpu_check.py holds their logic):
#   setup           python, torch and CUDA, the GPU; missing packages from $WHEELS_DIR or shared/wheels
#   cuda-tests      pytest -m cuda over the test files holding the mark (tests/test_cuda.py)
#   search-latency  bench/search_latency.py --device cuda: 1M labels, batch 1 and 256
#   finetune        MiniLM (--encoder transformer) on EURLEX57K, bf16, 256 steps: examples/s and dev P@5
#                   (data: $DATA_DIR/eurlex57k, ../shared/data/eurlex57k or shared/data/eurlex57k)
#   faiss-gpu       faiss flat inner product over the same W_L, where faiss has GPU support
# Everything lands in $OUT (default runs/gpu-check, from the repository root): gpu_check.log, logs/STEP.log,
# steps.tsv, BENCHMARKS.md (the benchmark sections) and gpu_check.md, the summary to paste into BENCHMARKS.md.
# $PYTHON picks the python (default: the machine's own; .venv/bin/python for --dry-run where there is one).
# Exit status 0 when no step failed.
set -u
cd "$(dirname "$0")/.."

DRY=""
case "${1:-}" in
  --dry-run) DRY=--dry-run ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT/logs" && OUT=$(cd "$OUT" && pwd) || { echo "error: cannot create $OUT" >&2; exit 2; }
LOG=$OUT/gpu_check.log
: > "$LOG"
: > "$OUT/steps.tsv"
rm -f "$OUT/BENCHMARKS.md" "$OUT/gpu_check.md"
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "$DRY" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=$(command -v python || command -v python3 || echo python); fi

# step NAME LIMIT_S CMD...: run CMD under a time limit (its own, or what is left of the budget), its output in
# logs/NAME.log and gpu_check.log; record NAME, pass | skip | fail, seconds and exit status in steps.tsv.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "skip: no time left of the ${BUDGET} s budget" > "$OUT/logs/$name.log"
    printf '%s\tskip\t0\t-\n' "$name" >> "$OUT/steps.tsv"
    echo "== $name: skip (no time left)" | tee -a "$LOG"
    return
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local t0 t1 rc status
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/logs/$name.log" >> "$LOG"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  case $rc in
    0) status=pass ;;
    3) status=skip ;;
    124|137) status=fail; echo "error: timed out after ${limit} s" | tee -a "$OUT/logs/$name.log" >> "$LOG" ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%.1f\t%s\n' "$name" "$status" "$(awk "BEGIN { print $t1 - $t0 }")" "$rc" >> "$OUT/steps.tsv"
  echo "== $name: $status (exit $rc)" | tee -a "$LOG"
}

CUDA_TESTS=$(grep -l "mark.cuda" tests/test_*.py 2>/dev/null | tr '\n' ' ')
# shellcheck disable=SC2086  # $DRY and $CUDA_TESTS are lists of words, unquoted on purpose

step setup 120 "$PY" bench/gpu_check.py setup --out "$OUT" $DRY
step cuda-tests 150 "$PY" bench/gpu_check.py pytest --out "$OUT" $DRY $CUDA_TESTS
if [ -n "$DRY" ]; then
  step search-latency 60 "$PY" bench/search_latency.py --quick --device cpu --benchmarks-file "$OUT/BENCHMARKS.md"
else
  step search-latency 150 "$PY" bench/search_latency.py --device cuda --recall-queries 100 \
    --benchmarks-file "$OUT/BENCHMARKS.md"
fi
step finetune 210 "$PY" bench/gpu_check.py finetune --out "$OUT" $DRY
step faiss-gpu 90 "$PY" bench/gpu_check.py faiss --out "$OUT" $DRY

"$PY" bench/gpu_check.py summary --out "$OUT" $DRY 2>&1 | tee -a "$LOG"
if [ ! -s "$OUT/gpu_check.md" ]; then  # no python to write it: the bare table
  { echo "## GPU check"; echo; echo "| step | result | time (s) | exit |"; echo "| --- | --- | ---: | ---: |"
    awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$OUT/steps.tsv"; } > "$OUT/gpu_check.md"
fi
echo "summary: $OUT/gpu_check.md; log: $LOG"
cat "$OUT/gpu_check.md"
! grep -q $'\tfail\t' "$OUT/steps.tsv"
