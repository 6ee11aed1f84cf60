"""What `adaptive_attn.host_memory.keep_freed_memory` (the training entry point's malloc policy) is worth:
each model's training step under glibc's own policy and under the kept heap, in one process, in turns (the
policy switches before every other step), with the median of the per-round ratios and its 95% interval.

    GOMP_SPINCOUNT=0 OMP_NUM_THREADS=1 python benchmarks/host_memory.py --models dense fixed25 adaptive \
        --seq-len 128 --batch 64 --overrides experiment=exp3_cpu_synthetic

glibc's policy is taken as a training loop settles it (blocks from 32 MiB mapped on their own, the heap
trimmed above 64 MiB).
"""

import argparse
import json

import torch
from throughput import build_steps, interval_text, paired_ratio
from timing import median, take_turns

from adaptive_attn.host_memory import glibc_policy, keep_freed_memory
from adaptive_attn.process import apply_training_settings, device_name

POLICIES = {"glibc": glibc_policy, "kept": keep_freed_memory}


def under(policy, step):
    """-> the step under the malloc policy: one step untimed, which settles the heap after the switch (kept
    memory is returned when glibc's policy takes over, and faulted in again after), then one timed, whose
    (ms, ...) it returns."""

    def run():
        if not policy():
            raise SystemExit("host_memory.py needs glibc's malloc (Linux)")
        step()
        return step()

    return run


def rounded(values: list[float]) -> list[float]:
    return [round(v, 2) for v in values]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dense", "fixed25", "adaptive"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calibrate", type=int, default=60, help="forward passes for adaptive budgets to reach target")
    p.add_argument("--overrides", nargs="*", default=["experiment=exp3_cpu_synthetic"])
    p.add_argument("--json", help="write the records to this path")
    args = p.parse_args()
    process = apply_training_settings()  # the rest of the training entry point's settings; the heap's switches
    as_throughput = argparse.Namespace(**vars(args), seed=0, stage="sparse", dtype="float32")
    steps, _ = build_steps(as_throughput, torch.device("cpu"))
    turns = [under(policy, step) for step in steps for policy in POLICIES.values()]
    timed = take_turns(turns, args.repeats, args.warmup, desc="rounds")
    device = device_name(torch.device("cpu"))
    print(f"\n{device} seq_len={args.seq_len} batch={args.batch} {args.overrides}")
    print(f"{'model':12s} {'glibc ms':>9s} {'kept ms':>8s} {'kept / glibc':>13s}   95% interval")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    records = []
    for i, name in enumerate(args.models):
        glibc_ms, kept_ms = ([t[0] for t in timed[2 * i + j]] for j in range(2))
        ratio, interval = paired_ratio(kept_ms, glibc_ms)
        print(f"{name:12s} {median(glibc_ms):9.1f} {median(kept_ms):8.1f} {ratio:13.3f}   {interval_text(interval)}")
        records.append(
            dict(model=name, device=device, process=process, **settings)
            | dict(
                glibc_ms=median(glibc_ms),
                kept_ms=median(kept_ms),
                ratio=ratio,
                interval=interval,
                glibc_round_ms=rounded(glibc_ms),
                kept_round_ms=rounded(kept_ms),
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
