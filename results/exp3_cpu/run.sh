#!/bin/bash
# The planned Experiment 3 grid on this CPU (157 jobs: counting L=64-128, text L=512-2048), all at one commit,
# in two lanes of one thread each. Re-running it skips every job whose summary.json says ok, so the grid can
# run in pieces:   bash results/exp3_cpu/run.sh   (from the repository root)
set -u
export GOMP_SPINCOUNT=0 OMP_NUM_THREADS=1
OUT=${OUT:-results/exp3_cpu}
MAIN=dense,fixed10,fixed25,adaptive10,adaptive,shuffled10
train() { python -m adaptive_attn.train -m "$@"; }

lane_a() {
  train experiment=exp3_cpu_text seq_len=512,1024 seed=0,1,2 model=$MAIN hydra.sweep.dir="$OUT/text"
  train experiment=exp3_cpu_text seq_len=2048 seed=0,1,2 model=$MAIN hydra.sweep.dir="$OUT/text"
  train experiment=exp3_cpu_synthetic seq_len=64 seed=0,1,2 model=$MAIN,oracle10 hydra.sweep.dir="$OUT/counting"
  train experiment=exp3_cpu_synthetic seq_len=64 seed=3,4 model=fixed10,adaptive10 hydra.sweep.dir="$OUT/counting"
  train experiment=exp3_cpu_synthetic seq_len=128 seed=0,1,2 model=dense,fixed10,adaptive10 \
    hydra.sweep.dir="$OUT/counting"
}

lane_b() {
  local rest=fixed50,fixed75,adaptive_topp,shuffled,oracle
  train experiment=exp3_cpu_text seq_len=512,1024 seed=0,1,2 model=$rest hydra.sweep.dir="$OUT/text"
  train experiment=exp3_cpu_text seq_len=2048 seed=0,1,2 model=$rest hydra.sweep.dir="$OUT/text"
  train experiment=exp3_cpu_synthetic seq_len=64 seed=0,1,2 model=$rest hydra.sweep.dir="$OUT/counting"
  train experiment=exp3_cpu_synthetic seq_len=128 seed=0,1,2 model=shuffled10,adaptive,fixed25 \
    hydra.sweep.dir="$OUT/counting"
}

lane_a > "$OUT/lane_a.log" 2>&1 &
lane_b > "$OUT/lane_b.log" 2>&1 &
wait
