#!/usr/bin/env bash
# The CPU tables of README: op level (token mode up to L=2048, block mode up to 4096) and model level
# (training steps timed in turns, with the component breakdown and Amdahl's bound), and what the training
# entry point's malloc policy is worth (host: a training step under glibc's policy and under the kept heap).
#   bash benchmarks/run_cpu.sh [OUT_DIR] [op|model|block|host|all]
# `block` runs only the block-mode model rows (research and default model), the per-pair cost of each
# attention form (`attention_forms.py`), a BLAS-built backward of the block call against SDPA's
# (`attention_backward.py`) and the rows' figure (`plot_speed.py`). REPEATS (default 9) sets
# their rounds: more where a CPU's speed drifts a lot. OMP_NUM_THREADS=1 times them as the CPU sweeps run
# (one thread per job, two jobs at once).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
PART=${2:-all}
mkdir -p "$OUT"
export GOMP_SPINCOUNT=0
if [ "$PART" = op ] || [ "$PART" = all ]; then
  python benchmarks/attention.py --modes block --lengths 256 512 1024 2048 4096 --keeps 0.25 0.5 0.75 --ks 64 \
      --json "$OUT/attention_cpu_block.json" | tee "$OUT/attention_cpu_block.txt"
  python benchmarks/attention.py --modes block --query-block 128 --lengths 2048 4096 --keeps 0.25 0.5 0.75 --ks \
      --json "$OUT/attention_cpu_block_qb128.json" | tee "$OUT/attention_cpu_block_qb128.txt"
  python benchmarks/attention.py --modes token --lengths 256 512 1024 2048 --keeps 0.25 0.5 0.75 --ks 64 \
      --json "$OUT/attention_cpu_token.json" | tee "$OUT/attention_cpu_token.txt"
fi
if [ "$PART" = model ] || [ "$PART" = block ] || [ "$PART" = all ]; then
  MODELS="--models dense fixed25 adaptive --repeats ${REPEATS:-9} --calibrate 60 --breakdown"
  # the research model on text (block mode: key blocks of 64, query blocks of 128; at L=512, 16 and 32, since
  # keep 0.25 of 512 tokens is no more than a query block of 128 attends anyway)
  for spec in "512 8 16 32" "1024 4 64 128" "2048 2 64 128" "4096 1 64 128"; do
    set -- $spec
    python benchmarks/throughput.py $MODELS --seq-len "$1" --batch "$2" --overrides experiment=research_text \
        model.sparse.block_size="$3" model.sparse.query_block="$4" \
        --json "$OUT/throughput_cpu_research_L$1.json" | tee "$OUT/throughput_cpu_research_L$1.txt"
  done
  # the default model (d_model 256, 4 layers) at L=2048, block mode
  python benchmarks/throughput.py $MODELS --seq-len 2048 --batch 1 \
      --overrides data=text model.sparse.block_size=64 model.sparse.query_block=128 \
      --json "$OUT/throughput_cpu_default_L2048.json" | tee "$OUT/throughput_cpu_default_L2048.txt"
  # what an attended pair costs in each form (research model, L=4096, fixed25's block call)
  python benchmarks/attention_forms.py --json "$OUT/attention_forms_L4096.json" | tee "$OUT/attention_forms_L4096.txt"
  # whether a backward built from BLAS products could beat SDPA's on that call
  python benchmarks/attention_backward.py --repeats "${REPEATS:-9}" --json "$OUT/attention_backward_L4096.json" \
      | tee "$OUT/attention_backward_L4096.txt"
  # the block-mode rows as a figure: each model's step by component
  python benchmarks/plot_speed.py "$OUT"/throughput_cpu_research_L{512,1024,2048,4096}.json \
      "$OUT/throughput_cpu_default_L2048.json" --out "$OUT/speed_breakdown.png"
fi
if [ "$PART" = model ] || [ "$PART" = all ]; then
  # the default model in token mode at L=256
  python benchmarks/throughput.py --models dense fixed25 fixed50 adaptive adaptive_topp --repeats 11 --calibrate 60 \
      --breakdown --seq-len 256 --batch 8 --overrides data=text \
      --json "$OUT/throughput_cpu_token_L256.json" | tee "$OUT/throughput_cpu_token_L256.txt"
  # the research model in token mode at L=512, as vote share's sweep runs it (batch 16, keep 0.1)
  python benchmarks/throughput.py --models dense fixed10 adaptive10 --repeats 9 --calibrate 60 --breakdown \
      --seq-len 512 --batch 16 --overrides experiment=exp3_cpu_votes \
      --json "$OUT/throughput_cpu_votes_L512.json" | tee "$OUT/throughput_cpu_votes_L512.txt"
  # vote share at L=2048 (batch 4, keep 0.1), in the sparse stage and in the dense warm-up, which is half the run
  for stage in sparse warmup; do
    python benchmarks/throughput.py --models dense fixed10 --repeats 7 --calibrate 0 --breakdown --stage "$stage" \
        --seq-len 2048 --batch 4 --overrides experiment=exp3_cpu_votes_2048 \
        --json "$OUT/throughput_cpu_votes_L2048_$stage.json" | tee "$OUT/throughput_cpu_votes_L2048_$stage.txt"
  done
fi
if [ "$PART" = host ] || [ "$PART" = all ]; then
  # counting as its sweep runs (two jobs side by side, one thread each), and the research model on text
  for L in 64 128; do
    OMP_NUM_THREADS=1 python benchmarks/host_memory.py --models dense fixed10 fixed25 adaptive --repeats 21 \
        --seq-len "$L" --batch 64 --overrides experiment=exp3_cpu_synthetic \
        --json "$OUT/host_memory_counting_L$L.json" | tee "$OUT/host_memory_counting_L$L.txt"
  done
  python benchmarks/host_memory.py --models dense fixed25 adaptive --repeats 21 --seq-len 2048 --batch 2 \
      --overrides experiment=research_text model.sparse.block_size=64 model.sparse.query_block=128 \
      --json "$OUT/host_memory_research_L2048.json" | tee "$OUT/host_memory_research_L2048.txt"
fi
