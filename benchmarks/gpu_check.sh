#!/usr/bin/env bash
# One prepared GPU check (< 10 minutes on an H100/H200, within one device call): correctness of the fused
# kernels against the reference on the GPU, the op-level timing table (dense SDPA/FlashAttention vs flex vs
# triton, bf16), then model-level training steps.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# It runs from the source tree with the machine's own torch and triton (a GPU machine without network
# access can run it as it is): the kernel tests and the op benchmark need nothing else. Each part writes
# as it goes, so a part cut short by its timeout keeps what it measured; L=8192 (the goals' length) runs first.
# The model-level part (the last two commands) also needs Hydra, which a bare GPU image may lack: where pip
# works, fetch it into .whl/ (git-ignored), bring that folder along, and this script installs from it:
#   python -m pip download --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! $PY -c "import hydra, omegaconf" 2>/dev/null && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_backends.py -k "triton or flex or backend" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 250 $PY benchmarks/attention.py --device cuda --dtype bfloat16 --batch 1 --heads 16 --head-dim 128 \
    --d-model 1024 --indexer-heads 8 --indexer-dim 64 --block-size 64 --query-block 128 \
    --lengths 8192 2048 16384 --keeps --ks 512 1024 2048 --modes token block --repeats 5 \
    --json "$OUT/attention_gpu.json" 2>"$OUT/attention_gpu.err" | tee "$OUT/attention_gpu.txt"
tail -5 "$OUT/attention_gpu.err"
# model level: training steps of the default model (d_model 256, 4 layers) in bf16 autocast, dense against
# sparse in turns: block mode (FlexAttention; adaptive's rank mask runs the torch backend) at L=8192, then
# token mode (Triton) at L=4096. It needs the project's Python dependencies (Hydra, Lightning).
timeout 90 $PY benchmarks/throughput.py --device cuda --dtype bfloat16 --models dense fixed25 adaptive \
    --seq-len 8192 --batch 1 --repeats 5 --calibrate 60 \
    --overrides data=text model.sparse.block_size=64 model.sparse.query_block=128 \
    --json "$OUT/throughput_gpu_block_L8192.json" 2>"$OUT/throughput_gpu.err" | tee "$OUT/throughput_gpu_block_L8192.txt"
timeout 60 $PY benchmarks/throughput.py --device cuda --dtype bfloat16 --models dense fixed25 \
    --seq-len 4096 --batch 1 --repeats 5 --overrides data=text \
    --json "$OUT/throughput_gpu_token_L4096.json" 2>>"$OUT/throughput_gpu.err" | tee "$OUT/throughput_gpu_token_L4096.txt"
tail -5 "$OUT/throughput_gpu.err"
