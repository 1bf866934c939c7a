#!/usr/bin/env bash
# One-shot validation of llama-kernels on a fresh Hopper GPU (H100 / H200) with no network:
#   bash benchmarks/gpu_check.sh OUTDIR [--dry-run | --smoke]
# The steps, their limits (summing to at most 420 s), the build and what lands in OUTDIR: see
# benchmarks/gpu_check.py, which this runs with $PYTHON (default python3, the one with torch).
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/gpu_check.py" "$@"
