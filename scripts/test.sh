#!/usr/bin/env bash
# Sets up the environment (same script as the quick start) and runs lint + the whole test suite.
# .ci/run calls exactly this; any failing test or lint error makes it exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/pytest -q "$@"
