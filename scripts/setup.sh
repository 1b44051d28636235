#!/usr/bin/env bash
# One setup for every place the project runs: the README quick start, CI and the Dockerfile.
# Creates a project-local virtual environment (.venv) unless VENV says otherwise, installs the
# pinned torch/torchvision first (they lie on this machine's disk; a fresh pip would otherwise pull
# a different build), then the project with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -e ".[dev]"
echo "stillroom environment ready in $VENV"
