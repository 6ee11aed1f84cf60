#!/bin/bash
# The grid of run.sh (157 jobs), with one dense warm-up per (task, length, seed) instead of one per sparse arm:
# fixed10 runs first and the group's other sparse arms start where its warm-up ended (warm_start=fixed10;
# dense ignores the key). In token mode (counting) every arm ends bit for bit where run.sh's does; in block
# mode (text) it draws the rest of its query blocks from the saved streams: the same distribution, not the
# same bits. Two lanes of one thread each take the groups from one queue, largest first, so neither waits
# on the other. Resumable: re-running it skips every job whose summary.json says ok.
#   bash results/exp3_cpu/run_warm_start.sh                  (from the repository root)
#   ONLY='^counting 128 0 ' bash results/exp3_cpu/run_warm_start.sh   (only the groups this regex matches)
set -u
export GOMP_SPINCOUNT=0 OMP_NUM_THREADS=1
OUT=${OUT:-results/exp3_cpu}
ALL=fixed10,dense,fixed25,adaptive10,adaptive,shuffled10,fixed50,fixed75,adaptive_topp,shuffled,oracle

groups() {  # data, length, seed, models (the warm-up's owner first), experiment; the costliest first
  for s in 0 1 2; do echo "text 2048 $s $ALL exp3_cpu_text"; done
  for s in 0 1 2; do echo "counting 128 $s fixed10,dense,adaptive10,shuffled10,adaptive,fixed25 exp3_cpu_synthetic"; done
  for s in 0 1 2; do echo "counting 64 $s $ALL,oracle10 exp3_cpu_synthetic"; done
  for s in 0 1 2; do echo "text 1024 $s $ALL exp3_cpu_text"; done
  for s in 0 1 2; do echo "text 512 $s $ALL exp3_cpu_text"; done
  for s in 3 4; do echo "counting 64 $s fixed10,adaptive10 exp3_cpu_synthetic"; done
}

QUEUE=$(mktemp)
trap 'rm -f "$QUEUE" "$QUEUE.lock"' EXIT
groups | grep -E -- "${ONLY:-.}" > "$QUEUE"

next_group() {  # pops the queue's first line; fails when it is empty
  (
    flock 9
    line=$(head -n 1 "$QUEUE")
    [ -n "$line" ] && sed -i 1d "$QUEUE" && echo "$line"
  ) 9> "$QUEUE.lock"
}

lane() {
  while group=$(next_group); do
    read -r data length seed models experiment <<< "$group"
    python -m adaptive_attn.train -m experiment="$experiment" seq_len="$length" seed="$seed" model="$models" \
      warm_start=fixed10 hydra.sweep.dir="$OUT/$data"
  done
}

mkdir -p "$OUT"
lane > "$OUT/warm_lane_a.log" 2>&1 &
lane > "$OUT/warm_lane_b.log" 2>&1 &
wait
