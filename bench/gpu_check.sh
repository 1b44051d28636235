#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): do the CUDA paths work, and how fast is each phase? One command, under
# 8 minutes on one H100 with 16 cores. In --out DIR it writes gpu_check.json (rewritten after every
# measurement, so a run cut short still returns what it measured), gpu_check.md (the tables, also printed),
# gpu_check.log (everything printed) and nvidia-smi.txt.
#
# On the GPU machine (no network; make bench/wheels first, where the registries are reachable, with
# `bash bench/gpu_wheels.sh bench/wheels`, and carry it there with the working tree):
#   PYTHON=python3 WHEELS=bench/wheels bash bench/gpu_check.sh --out "$OUT"
# Where the project's .venv exists (made by scripts/setup.sh when missing):
#   bash bench/gpu_check.sh [--out DIR]
# A smoke run of every step at toy size on a CPU (the tests run it):
#   bash bench/gpu_check.sh --smoke --out /tmp/gpu-check
#
# Options of this script (every other option goes to bench/gpu_check.py, listed below):
#   --wheels DIR  or WHEELS=DIR: install what PYTHON lacks from DIR only (the folder gpu_wheels.sh made):
#                 pip install --no-index --no-deps --target a temporary folder, on top of PYTHON's own torch,
#                 timm and the rest; nothing is fetched and scripts/setup.sh never runs. The repository goes
#                 on PYTHONPATH (the project need not be installed).
#   --python PY   or PYTHON=PY: the interpreter (default .venv/bin/python)
#   --out DIR     where the results go (default $OUT when set, else bench/results)
#   --limit-s S   or LIMIT_S=S: stop the check after S seconds (default 570: the device allows 600 a command);
#                 what it measured by then is kept and shown
set -euo pipefail
cd "$(dirname "$0")/.."
header() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
fail() { echo "error: $*" >&2; exit 2; }
WHEELS=${WHEELS:-}
PYTHON=${PYTHON:-}
LIMIT_S=${LIMIT_S:-570}
OUTDIR=${OUT:-bench/results}
HELP=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --python=*) PYTHON=${1#*=}; shift ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
    --out=*) OUTDIR=${1#*=}; shift ;;
    --limit-s) LIMIT_S=${2:?--limit-s needs seconds}; shift 2 ;;
    --limit-s=*) LIMIT_S=${1#*=}; shift ;;
    -h|--help) HELP=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ "$HELP" = 1 ]; then
  header
  echo
  "${PYTHON:-.venv/bin/python}" bench/gpu_check.py --help 2>/dev/null || echo "(bench/gpu_check.py --help: give PYTHON)"
  exit 0
fi
# The check's data, runs and compile caches, removed on exit even when --limit-s kills the check (which
# then cannot clean up after itself).
WORK=$(mktemp -d "${TMPDIR:-/tmp}/stillroom-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
if [ -n "$WHEELS" ]; then
  PYTHON=${PYTHON:-python3}
  command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON: no such interpreter"
  SITE=$(mktemp -d "$WORK/site.XXXXXX")
  INSTALLED=$("$PYTHON" bench/gpu_install.py "$WHEELS" "$SITE") || exit 2
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if [ -z "$PYTHON" ]; then
    PYTHON=.venv/bin/python
    [ -x "$PYTHON" ] || bash scripts/setup.sh
  fi
  command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON: no such interpreter"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$OUTDIR"
echo "${INSTALLED:-no --wheels: using the packages of $PYTHON}" | tee "$OUTDIR/gpu_check.log"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1 || true
fi
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}  # deterministic cuBLAS, for the bitwise checks
export PYTHONUNBUFFERED=1 TMPDIR="$WORK"
set +e
# timeout signals its whole process group (the check, its loader workers and compile workers); the JSON
# already holds every measurement finished by then. The subshell keeps bash's "Killed" notice out of the output.
(timeout -s KILL "$LIMIT_S" "$PYTHON" bench/gpu_check.py --out "$OUTDIR" ${ARGS[@]+"${ARGS[@]}"} 2>&1; exit $?) 2>/dev/null |
  tee -a "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  if [ -f "$OUTDIR/gpu_check.json" ]; then
    echo "error: the check ran past --limit-s $LIMIT_S s and was stopped; what it measured before:" | tee -a "$OUTDIR/gpu_check.log" >&2
    "$PYTHON" bench/gpu_report.py "$OUTDIR/gpu_check.json" --md "$OUTDIR/gpu_check.md" | tee -a "$OUTDIR/gpu_check.log"
  else
    echo "error: the check ran past --limit-s $LIMIT_S s and was stopped before it wrote any result" | tee -a "$OUTDIR/gpu_check.log" >&2
  fi
fi
exit "$rc"
