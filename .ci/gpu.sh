#!/usr/bin/env bash
# A lent GPU session in one device call of at most 9 minutes, from the repo root, most evidence first:
#   1. the device and the versions of Python, torch, triton and CUDA
#   2. the test suite in parallel (pytest-xdist, -n one process per core: the ~630 kernel variants the
#      tests need compile in parallel into Triton's shared on-disk cache, 1.5-2.7 s each)
#   3. the determinism tests twice, in two processes, their compared tensors hashed (bench.bitwise):
#      bitwise equal across the runs, or which tests differ
#   4. the headline benchmark (bench.headline): forward and backward, bf16, D = 128, causal and not,
#      4k-16k; decoding at 16k; key padding; causal at D = 256 and 512 (4k, 16k) and decoding at 512;
#      against every SDPA backend, then compiled FlexAttention
#   5. with the time left, config.py's tiles and candidates around them, timed per pass (bench.tiles)
# Each step runs under a timeout within the 9 minutes (SIGINT first, so that pytest and the drivers
# write what they have) and its status and time go to $OUT/summary.txt as it ends, so a step that
# runs out of time loses only itself. Files under $OUT (8 at most come back from a device call):
#   summary.txt      device, versions, each step's status and time, the results in brief (printed last)
#   pytest.txt       the suite's output
#   determinism.txt  both runs' output and the comparison
#   headline.json    the benchmark's rows (bench/report.py's format, device and versions in meta)
#   headline.md      its tables
#   tiles.json       the tile timings per pass
#   tiles.md         their table
#   log.txt          the drivers' progress and errors
# `bash .ci/gpu.sh --dry-run` runs the same steps on a CPU: the kernels in Triton's interpreter, a
# few small tests, toy shapes (tests/test_gpu_script.py runs it). $PYTHON picks the interpreter
# (default python3, the GPU image's; python where there is no python3); GPU_SH_BUDGET_S (default 540)
# shortens the whole for a session with less device time left.
set -uo pipefail
cd "$(dirname "$0")/.."
case ${1:-} in
  "") DRY_RUN=0 ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: bash .ci/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH=. PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt LOG=$OUT/log.txt
: >"$SUMMARY"
: >"$LOG"
: >"$OUT/determinism.txt"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
DEADLINE=$((SECONDS + ${GPU_SH_BUDGET_S:-540}))
TILES_S=60  # kept for the tile timings while the headline runs
FINAL_S=20  # kept for a step's kill after its SIGINT (timeout -k 15) and the summary
if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1
  TESTS=(tests/test_attention.py -k default_scale_is_inverse_sqrt_head_dim)
  DETERMINISM=(tests/test_attention.py -k bitwise_deterministic)
  DRIVER_FLAGS=(--dry-run)
else
  TESTS=(tests)
  DETERMINISM=(tests -k "determinis or bitwise")
  DRIVER_FLAGS=()
fi
FAILED=0

note() { echo "$*" >>"$SUMMARY"; }

# budget WANTED: WANTED seconds, or fewer where the deadline (less FINAL_S) comes first.
budget() {
  local left=$((DEADLINE - SECONDS - FINAL_S))
  echo $((left < $1 ? left : $1))
}

# step NAME LIMIT COMMAND...: COMMAND under a timeout of LIMIT seconds; its status and time go to
# the summary. Under 10 seconds left, the step is skipped.
step() {
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  if [ "$limit" -lt 10 ]; then
    note "$name: skipped (out of time)"
    FAILED=1
    return
  fi
  timeout -s INT -k 15 "$limit" "$@"
  local rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" FAILED=1 ;;
    *) status="failed (exit $rc)" FAILED=1 ;;
  esac
  note "$name: $status, $((SECONDS - start)) s of $limit s"
}

note "== device and versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$SUMMARY" 2>/dev/null ||
  note "no nvidia-smi"
"$PYTHON" - >>"$SUMMARY" 2>&1 <<'PY'
import platform, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA {torch.version.cuda}, {gpu}")
PY

note "== tests"
PARALLEL=()  # without pytest-xdist (the CPU suite does not need it), one process
if "$PYTHON" -c "import xdist" 2>/dev/null; then
  PARALLEL=(-n "$(nproc)")
fi
note "pytest ${PARALLEL[*]:-without pytest-xdist: one process}"
step tests "$(budget 240)" "$PYTHON" -m pytest "${TESTS[@]}" "${PARALLEL[@]}" -q -p no:cacheprovider \
  >"$OUT/pytest.txt" 2>&1
note "  $(grep -E '[0-9]+ (passed|failed|error)' "$OUT/pytest.txt" | tail -n 1)"
grep -E '^(FAILED|ERROR) ' "$OUT/pytest.txt" | head -n 20 | sed 's/^/  /' >>"$SUMMARY"
cubins=$(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.cubin' 2>/dev/null | wc -l)
note "  kernel binaries in this machine's Triton cache: $cubins"

note "== determinism"
for run in 1 2; do
  echo "== run $run" >>"$OUT/determinism.txt"
  step "determinism run $run" "$(budget 45)" "$PYTHON" -m pytest -p bench.bitwise \
    --hashes "$SCRATCH/hashes-$run.json" "${DETERMINISM[@]}" -q -p no:cacheprovider >>"$OUT/determinism.txt" 2>&1
done
"$PYTHON" -m bench.bitwise "$SCRATCH"/hashes-{1,2}.json >>"$OUT/determinism.txt" 2>&1 || FAILED=1
note "  $(tail -n 1 "$OUT/determinism.txt")"

note "== headline"
# Every driver starts its last run by 3/4 of its limit: the rest is for the run under way.
limit=$(($(budget 600) - TILES_S))
step headline "$limit" "$PYTHON" -m bench.headline --out "$OUT" --budget-s $((limit * 3 / 4)) \
  "${DRIVER_FLAGS[@]}" >"$SCRATCH/headline.txt" 2>>"$LOG"
tee -a "$LOG" <"$SCRATCH/headline.txt" >>"$SUMMARY"

note "== tiles"
limit=$(budget 600)
step tiles "$limit" "$PYTHON" -m bench.tiles --out "$OUT" --budget-s $((limit * 3 / 4)) "${DRIVER_FLAGS[@]}" \
  >"$SCRATCH/tiles.txt" 2>>"$LOG"
tee -a "$LOG" <"$SCRATCH/tiles.txt" >>"$SUMMARY"

note "== files: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$SUMMARY"
exit "$FAILED"
