#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): do the CUDA paths work, and how fast is each phase? One command,
# about 5 minutes on one GPU with 16 cores; writes bench/results/gpu_check.json and prints its table.
#
#   bash bench/gpu_check.sh                       # on a GPU machine (sets up .venv first if needed)
#   bash bench/gpu_check.sh --device cpu --images 48 --img-size 32 --steps 2 --batch-size 8 --views 2 \
#       --forward-batches 2 --workers 0 --out /tmp/gpu_check.json      # a smoke run on a CPU (a test does this)
#
# PYTHON selects the interpreter (default .venv/bin/python, created by scripts/setup.sh when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  bash scripts/setup.sh
fi
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS, for the bitwise checks
"$PYTHON" bench/gpu_check.py "$@"
