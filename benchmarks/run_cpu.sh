#!/usr/bin/env bash
# The CPU tables of README: op-level (token mode up to L=2048, block mode up to 4096) and model-level.
#   bash benchmarks/run_cpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
mkdir -p "$OUT"
export GOMP_SPINCOUNT=0
python benchmarks/attention.py --modes block --lengths 256 512 1024 2048 4096 --keeps 0.25 0.5 0.75 --ks 64 \
    --json "$OUT/attention_cpu_block.json" | tee "$OUT/attention_cpu_block.txt"
python benchmarks/attention.py --modes block --query-block 128 --lengths 2048 4096 --keeps 0.25 0.5 0.75 --ks \
    --json "$OUT/attention_cpu_block_qb128.json" | tee "$OUT/attention_cpu_block_qb128.txt"
python benchmarks/attention.py --modes token --lengths 256 512 1024 2048 --keeps 0.25 0.5 0.75 --ks 64 \
    --json "$OUT/attention_cpu_token.json" | tee "$OUT/attention_cpu_token.txt"
python benchmarks/throughput.py --models dense fixed25 fixed50 adaptive adaptive_topp --seq-len 256 --batch 8 --repeats 11 \
    --json "$OUT/throughput_cpu.json" | tee "$OUT/throughput_cpu.txt"
