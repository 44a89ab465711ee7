#!/usr/bin/env bash
# Install (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
. "${LMTUNE_VENV:-.venv}/bin/activate"
python -m pytest "$@"
