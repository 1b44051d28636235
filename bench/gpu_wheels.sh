#!/usr/bin/env bash
# Wheels of what the GPU check needs that the GPU machine lacks, for that machine to install offline.
#
#   bash bench/gpu_wheels.sh DIR [--python-version 3.12]
#
# Run it where the package registries are reachable, from a checkout whose .venv the tests ran in
# (scripts/setup.sh): the packages and their versions are those bench/gpu_deps.py reads from that venv
# (zarr, numcodecs, webdataset and what they need beyond the machine's torch/timm stack). It downloads
# them as wheels for CPython X.Y (--python-version, default 3.12: the GPU machine's) on manylinux x86-64,
# writes DIR/requirements.txt (NAME==VERSION, what bench/gpu_check.sh installs from DIR) and prints their
# total size: DIR travels to the GPU machine with the working tree (64 MiB in all). DIR = bench/wheels
# (git-ignored) is what docs/benchmarks.md's GPU section uses.
#
# PYTHON selects the venv the versions are read from (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
DIR=""
PYV=3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYV=${2:?--python-version needs X.Y}; shift 2 ;;
    --python-version=*) PYV=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
[ -n "$DIR" ] || { echo "error: give the folder to fill: bash bench/gpu_wheels.sh DIR (see --help)" >&2; exit 2; }
[[ $PYV =~ ^3\.[0-9]+$ ]] || { echo "error: --python-version $PYV: expected X.Y, e.g. 3.12" >&2; exit 2; }
PYTHON=${PYTHON:-.venv/bin/python}
if ! [ -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found: run scripts/setup.sh first (the pins are read from the venv the tests run in), or set PYTHON" >&2
  exit 2
fi
mkdir -p "$DIR"
"$PYTHON" bench/gpu_deps.py --python-version "$PYV" > "$DIR/requirements.txt"
# The machine runs torch's cu130 wheels, which are manylinux_2_28: its glibc takes any wheel up to 2.28.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
  --python-version "$PYV" --implementation cp --abi "cp${PYV/./}" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -r "$DIR/requirements.txt"
"$PYTHON" - "$DIR" <<'PY'
import sys
from pathlib import Path

folder = Path(sys.argv[1])
pins = [line.strip() for line in (folder / "requirements.txt").read_text().splitlines() if line.strip()]
wheels = sorted(folder.glob("*.whl"))
size = sum(w.stat().st_size for w in wheels)
print(f"{len(pins)} packages ({', '.join(pins)}) in {len(wheels)} wheels: {size / 2**20:.1f} MiB in {folder}")
if size > 32 * 2**20:  # the working tree and this folder together may carry 64 MiB to the GPU machine
    sys.exit(f"error: {folder} holds {size / 2**20:.1f} MiB of wheels: more than 32 MiB, half of what may travel")
PY
