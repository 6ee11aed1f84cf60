#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on an H100/H200): correctness of the fused kernels against the
# reference on the GPU, then the timing table (dense SDPA/FlashAttention vs flex vs triton, bf16).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-results}}
mkdir -p "$OUT"
python -m pip install -q -e ".[dev]" 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_sparse.py -k "triton or flex or backend" 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
timeout 300 python benchmarks/attention.py --device cuda --dtype bfloat16 --batch 1 --heads 16 --head-dim 128 \
    --d-model 1024 --indexer-heads 8 --indexer-dim 64 --block-size 64 --query-block 128 \
    --lengths 2048 8192 16384 --keeps --ks 512 1024 2048 --modes token block --repeats 5 \
    --json "$OUT/attention_gpu.json" 2>&1 | tee "$OUT/attention_gpu.txt" | tail -40
