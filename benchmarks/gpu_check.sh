#!/usr/bin/env bash
# The prepared GPU check (issue 18): at most ~8 minutes on one CUDA GPU. Run it where a GPU is lent, from the
# repository root: `bash benchmarks/gpu_check.sh [OUT_DIR]`. It runs
#   1. the GPU-only tests (tests/test_gpu.py; tests/test_bf16_parity.py also runs its cuda cases there),
#   2. `lmtune estimate` against torch.cuda.max_memory_allocated for 6 real training configs, and
#   3. benchmarks/vs_peft.py LoRA (and QLoRA where bitsandbytes is installed) in bf16 and bf16-mixed,
# on random-weight models of SmolLM2-135M's and a 1.1B llama's shapes (benchmarks/gpu_check.py; no downloads).
# A GPU image without lmtune's pure-Python dependencies (pydantic ...) gets them from wheels in .whl/, made here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 gguf==0.19.0
# (versions: requirements/lock.txt). Results land in OUT_DIR (default benchmarks/results/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"; } \
  2>&1 | tee "$out/gpu.txt"
timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_bf16_parity.py 2>&1 | tee "$out/tests.log"
timeout 150 "$py" benchmarks/gpu_check.py --out "$out" --skip-speed 2>&1 | tee "$out/memory.log"
timeout 200 "$py" benchmarks/gpu_check.py --out "$out" --skip-memory 2>&1 | tee "$out/speed.log"
echo "gpu check: $(( $(date +%s) - start )) s" | tee -a "$out/gpu.txt"
