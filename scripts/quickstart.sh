#!/usr/bin/env bash
# Install (if needed), teach the default model a new identity with LoRA, then compare base and tuned answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${LMTUNE_VENV:-.venv}/bin/activate"
lmtune train examples/quickstart.yaml overwrite=true
python examples/before_after.py runs/quickstart
