#!/usr/bin/env bash
# The GPU checks, as one prepared run for a lent GPU machine (no internet, no venv: torch with CUDA, triton,
# transformers, safetensors, tokenizers and pytest are expected to be installed):
#   1. the GPU tests (CUDA graphs, the Triton kernels compiled, bf16, sleep/wake with weight offload; where
#      ray, omegaconf and math-verify are installed, 3 GRPO steps of the whole RL loop on the GPU) and every
#      rollout test, on the GPU machine;
#   2. `m2flow bench rollout` on Qwen2.5-1.5B's architecture with random weights, bf16, batch 1 / 64 / 256,
#      1024 prompt + 1024 generated tokens: tokens/s against HF generate and the decode step against the
#      memory-bandwidth bound; then short runs (batch 1 / 64, 256 new tokens) without CUDA graphs, with
#      the torch kernels, and with both on (profiled: kernels per step, GPU busy vs idle time, top kernels),
#      to see what each gains and where a step's time goes.
# Results (logs, the benchmark JSON) go to $OUT (default /tmp/m2flow-gpu-check).
#   bash benchmarks/gpu_check.sh            # everything (about 6-8 minutes on an H100)
#   PATH=$PWD/.venv/bin:$PATH PRESET=tiny SIZES=1,4 NEW=16 SHORT_SIZES=1,2 SHORT_NEW=8 PROMPT=16 DEVICE=cpu DTYPE=float32 \
#     bash benchmarks/gpu_check.sh bench   # a dry run of the benchmark part on CPU
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
  # the RL loop on the GPU (tests/gpu/test_rl_gpu.py) also needs ray, omegaconf and math-verify
  skip_rl=$(python -c "import ray, omegaconf, math_verify" 2>/dev/null || echo "--ignore=tests/gpu/test_rl_gpu.py")
  [ -n "$skip_rl" ] && echo "ray/omegaconf/math-verify missing: not running tests/gpu/test_rl_gpu.py" | tee -a "$OUT/gpu.txt"
  python -m pytest -q -s -p no:cacheprovider -m "gpu or not slow" $skip_rl tests/gpu tests/rollout tests/test_bench_rollout.py 2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ "$what" != tests ]; then
  dtype=${DTYPE:-bfloat16}
  model=$(python -c "from m2flow.bench.rollout import build_model_dir; print(build_model_dir('${PRESET:-qwen2.5-1.5b}', '$dtype')[0])" | tail -1)
  bench() { python -m m2flow.cli bench rollout --model "$model" --device "${DEVICE:-cuda}" --dtype "$dtype" \
              --prompt-tokens "${PROMPT:-1024}" --repeats "${REPEATS:-1}" --out-dir "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"
            [ "${PIPESTATUS[0]}" = 0 ] || status=1; }
  # the issue's benchmark: against HF generate, decode step against the memory-bandwidth bound
  bench --batch-sizes "${SIZES:-1,64,256}" --new-tokens "${NEW:-1024}"
  # what the CUDA graphs and the Triton kernels each gain (shorter runs, no HF baseline)
  bench --batch-sizes "${SHORT_SIZES:-1,64}" --new-tokens "${SHORT_NEW:-256}" --no-hf --no-cuda-graphs --tag short
  bench --batch-sizes "${SHORT_SIZES:-1,64}" --new-tokens "${SHORT_NEW:-256}" --no-hf --kernels torch --tag short
  # the default path again, with a per-decode-step profile: kernels per step, GPU busy vs wall time, top kernels
  bench --batch-sizes "${SHORT_SIZES:-1,64}" --new-tokens "${SHORT_NEW:-256}" --no-hf --tag short --profile
fi
exit "$status"
