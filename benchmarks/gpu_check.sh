#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent GPU machine (no internet, no venv: torch with CUDA, triton,
# transformers, safetensors, tokenizers and pytest are expected to be installed):
#   1. the GPU tests (CUDA graphs, the Triton kernels compiled, bf16, sleep/wake with weight offload)
#      and every rollout test, on the GPU machine;
#   2. `m2flow bench rollout` on Qwen2.5-1.5B's architecture with random weights, bf16, batch 1 / 64 / 256,
#      1024 prompt + 1024 generated tokens: tokens/s against HF generate and the decode step against the
#      memory-bandwidth bound.
# Results (logs, the benchmark JSON) go to $OUT (default /tmp/m2flow-gpu-check).
#   bash benchmarks/gpu_check.sh            # everything (about 6-8 minutes on an H100)
#   PRESET=tiny SIZES=1,4 NEW=16 PROMPT=16 DEVICE=cpu DTYPE=float32 bash benchmarks/gpu_check.sh bench   # dry run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/m2flow-gpu-check}
mkdir -p "$OUT"
what=${1:-all}
status=0
if [ "$what" != bench ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
  python -m pytest -q -p no:cacheprovider -m "gpu or not slow" tests/gpu tests/rollout tests/test_bench_rollout.py 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "$what" != tests ]; then
  python -m m2flow.cli bench rollout --preset "${PRESET:-qwen2.5-1.5b}" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
    --batch-sizes "${SIZES:-1,64,256}" --prompt-tokens "${PROMPT:-1024}" --new-tokens "${NEW:-1024}" --repeats "${REPEATS:-1}" \
    --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit "$status"
