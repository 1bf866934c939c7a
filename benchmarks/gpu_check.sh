#!/usr/bin/env bash
# One-shot validation of llama-kernels on a fresh Hopper GPU (H100 / H200) with no network:
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
# Builds llama_kernels._C for sm_90a only, then runs `llama-kernels selftest --bench --json`,
# `pytest -m gpu` (a per-test timeout where pytest-timeout is installed), the kernel benchmarks
# (benchmarks/bench_*.py except generate/serve) at their main shapes, and bench_generate.py for
# Llama 3.1 8B (random weights) in FP8 and INT4 at batch 1 and 8. Everything lands in OUTDIR: each
# step's log and JSON, the selftest's record of passing kernels (validated.json), and summary.txt
# (device, versions, date, each step's result and time, the failed steps). A failing step does not
# stop the rest. Each step has a time limit, cut to what is left of GPU_CHECK_BUDGET_S seconds
# (default 470: under 8 minutes) for all together, so the steps run in order of importance and
# the last ones get less time when earlier ones run long. Exit status: 0 when every step passed.
# Needs on the machine: python3 with torch, triton, pytest, scikit-build-core, pybind11, cmake,
# ninja, and nvcc (no downloads: pip runs with --no-build-isolation --no-deps --no-index).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUTDIR="" DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_check.sh: unknown option '$arg'" >&2; usage ;;
    *) [[ -z "$OUTDIR" ]] || { echo "gpu_check.sh: one OUTDIR only (got '$OUTDIR' and '$arg')" >&2; usage; }
       OUTDIR="$arg" ;;
  esac
done
[[ -n "$OUTDIR" ]] || usage

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
START=$(date +%s)
FAILED=()
STEPS=()

# step NAME LIMIT_S COMMAND...: run COMMAND in OUTDIR (not the repo: there `python -m` would import the
# source tree, which has no _C, instead of the installed package) with a time limit of LIMIT_S
# seconds (less when the overall budget has less left), its output in OUTDIR/NAME.log; record the
# result, keep going.
step() {
  local name="$1" limit="$2"; shift 2
  if (( DRY )); then
    printf '%-16s %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  (( limit > left )) && limit=$left
  if (( limit < 5 )); then
    STEPS+=("$name: SKIPPED (time budget spent)"); FAILED+=("$name"); echo "== $name: skipped, no time left"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0=$(date +%s) rc
  (cd "$OUTDIR" && timeout --kill-after=10 "$limit" "$@") >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 4 "$OUTDIR/$name.log" | sed 's/^/   /'
  if (( rc == 0 )); then
    STEPS+=("$name: ok (${took}s)")
  else
    local why="exit $rc"; (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s"
    STEPS+=("$name: FAILED, $why (${took}s; see $name.log)"); FAILED+=("$name")
  fi
}

if (( ! DRY )); then
  mkdir -p "$OUTDIR" || exit 2
  OUTDIR="$(cd "$OUTDIR" && pwd)"
fi
# The selftest's record of passing kernels goes into OUTDIR (and is what dispatch reads here afterwards).
export LLAMA_KERNELS_VALIDATED="$OUTDIR/validated.json"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 8)}"
PYTEST_TIMEOUT=()
if (( ! DRY )) && "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_TIMEOUT=(--timeout=60); fi
(( DRY )) && { echo "# plan (dry run): every step runs in $OUTDIR, its output in $OUTDIR/<step>.log; budget ${BUDGET}s"; PYTEST_TIMEOUT=("[--timeout=60 if pytest-timeout is installed]"); }

step environment 20 bash -c "set -e; nvidia-smi; $PY -c 'import torch, triton, platform; print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'; nvcc --version"
step build 140 env LLAMA_KERNELS_CUDA_ARCHS=90a "$PY" -m pip install --no-build-isolation --no-deps --no-index -v "$REPO"
step info 15 "$PY" -m llama_kernels info
step selftest 150 "$PY" -m llama_kernels selftest --bench --json "$OUTDIR/selftest.json"
step pytest_gpu 120 "$PY" -m pytest "$REPO/tests" -m gpu -q -rfEs -p no:cacheprovider ${PYTEST_TIMEOUT[@]+"${PYTEST_TIMEOUT[@]}"} \
  --junitxml="$OUTDIR/pytest_gpu.xml"
for bench in "$REPO"/benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  case "$name" in bench_generate|bench_serve) continue ;; esac
  step "$name" 30 "$PY" "$REPO/benchmarks/$name.py" --backends cuda,triton --iters 10 --out "$OUTDIR/$name.json"
done
for quant in fp8 int4; do
  step "generate_8b_$quant" 60 "$PY" "$REPO/benchmarks/bench_generate.py" --preset llama-3.1-8b --quant "$quant" \
    --batch-sizes 1,8 --prompt-len 128 --new-tokens 32 --out "$OUTDIR/generate_8b_$quant.json"
done

(( DRY )) && exit 0
{
  echo "llama-kernels gpu_check  $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')"
  grep -m1 -E "^(NVIDIA|Tesla) " "$OUTDIR/environment.log" 2>/dev/null
  grep -m1 "^python " "$OUTDIR/environment.log" 2>/dev/null
  grep -m1 -i "driver version" "$OUTDIR/environment.log" 2>/dev/null | tr -s ' '
  grep -m1 "^# .* checks passed" "$OUTDIR/selftest.log" 2>/dev/null | sed 's/^# /selftest: /'
  grep -E "[0-9]+ (passed|failed|skipped|deselected|error)" "$OUTDIR/pytest_gpu.log" 2>/dev/null | tail -1 | sed 's/^/pytest -m gpu: /'
  printf '%s\n' "${STEPS[@]}"
  echo "total $(( $(date +%s) - START ))s"
  if (( ${#FAILED[@]} )); then echo "FAILED steps: ${FAILED[*]}"; else echo "all steps passed"; fi
} >"$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt"
(( ${#FAILED[@]} == 0 ))
