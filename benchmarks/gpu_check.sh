#!/usr/bin/env bash
# One prepared GPU check (< 9 minutes on an H100/H200): correctness of the fused kernels against the
# reference on the GPU, then the timing table (dense SDPA/FlashAttention vs flex vs triton, bf16).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# It runs from the source tree with the machine's own torch and triton (a GPU machine without network
# access can run it as it is): the kernel tests and the benchmark need nothing else. Each part writes
# as it goes, so a part cut short by its timeout keeps what it measured; L=8192 (the goals' length) runs first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 210 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_backends.py -k "triton or flex or backend" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 300 $PY benchmarks/attention.py --device cuda --dtype bfloat16 --batch 1 --heads 16 --head-dim 128 \
    --d-model 1024 --indexer-heads 8 --indexer-dim 64 --block-size 64 --query-block 128 \
    --lengths 8192 2048 16384 --keeps --ks 512 1024 2048 --modes token block --repeats 5 \
    --json "$OUT/attention_gpu.json" 2>"$OUT/attention_gpu.err" | tee "$OUT/attention_gpu.txt"
tail -5 "$OUT/attention_gpu.err"
