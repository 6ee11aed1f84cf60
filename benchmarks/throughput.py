"""Model-level benchmark: training-step time of each model variant, timed in one process.

Prints step time, tokens/s and the ratio to the first model (the baseline, `dense` by default) and,
when both are present, adaptive / fixed25 (equal mean compute: the adaptive target is 0.25).

    GOMP_SPINCOUNT=0 python benchmarks/throughput.py --models dense fixed25 adaptive --seq-len 512 \
        --json results/throughput_cpu.json
"""

import argparse
import json
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from timing import median, take_turns
from tqdm.auto import tqdm

from adaptive_attn.config import CONF_DIR
from adaptive_attn.lit.module import split_batch


def build_model(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", *overrides])
    return instantiate(cfg.model), cfg


def training_step(model, batch, calibrate: int):
    """-> a function running one forward + backward + AdamW step, every DSA layer in its sparse stage.

    First `calibrate` forward passes let adaptive budgets reach their target (their dual ascent runs
    after each step), so the timing compares equal compute. The optimizer runs with lr 0: the step does
    all its arithmetic, but the weights (and with them MoE routing and the adaptive budgets) stay where
    calibration left them instead of drifting on the one repeated batch.
    """
    model.set_training_step(10**9)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    inputs, targets = split_batch(batch)
    with torch.no_grad():
        for _ in range(calibrate if any(True for _ in model.sparse_layers()) else 0):
            _, aux = model(inputs)
            model.after_training_step(aux["sparsity"])

    def step() -> tuple[float, float]:
        """-> (ms, equivalent keep, mean over the layers)"""
        start = time.perf_counter()
        logits, aux = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        (loss + aux["balance_loss"] + aux.get("indexer_kl", 0.0)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = 1000 * (time.perf_counter() - start)
        model.after_training_step(aux.get("sparsity"))
        keep = [float(layer["equivalent_keep"]) for layer in aux.get("sparsity", [])] or [1.0]
        return ms, sum(keep) / len(keep)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dense", "fixed25", "fixed50", "adaptive", "adaptive_topp"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calibrate", type=int, default=100, help="forward passes for adaptive budgets to reach target")
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides, e.g. model.sparse.block_size=64")
    p.add_argument("--json", help="write the records to this path")
    args = p.parse_args()
    torch.set_flush_denormal(True)  # as the training entry point does

    steps = []
    for name in tqdm(args.models, desc="build + calibrate"):
        # same seed for every model: shared weights (budgets draw no random numbers) and the same batch,
        # so MoE routing, and with it the expert GEMM sizes, differ only through attention
        torch.manual_seed(args.seed)
        model, cfg = build_model(name, [f"seq_len={args.seq_len}", *args.overrides])
        tokens = torch.randint(0, cfg.data.vocab_size, (args.batch, args.seq_len + 1))
        steps.append(training_step(model, {"tokens": tokens}, args.calibrate))
    timed = take_turns(steps, args.repeats, args.warmup, desc="rounds")  # [(ms, keep)] per model
    records = []
    for name, t in zip(args.models, timed):
        ms = median([ms for ms, _ in t])
        keep = [k for _, k in t]  # adaptive budgets move around their target while they train
        records.append(
            {
                "model": name,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "step_ms": round(ms, 2),
                "tokens_per_s": round(args.batch * args.seq_len / ms * 1000, 1),
                "equivalent_keep": round(sum(keep) / len(keep), 4),
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "overrides": args.overrides,
            }
        )
    base = records[0]["step_ms"]
    print(f"\nseq_len={args.seq_len} batch={args.batch} cpu threads={torch.get_num_threads()}")
    print(f"{'model':14} {'step ms':>9} {'tokens/s':>9} {'eq. keep':>9} {'vs ' + records[0]['model']:>10}")
    for r in records:
        r["ratio_vs_baseline"] = round(r["step_ms"] / base, 3)
        cols = f"{r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['equivalent_keep']:>9.3f}"
        cols += f" {r['ratio_vs_baseline']:>10.3f}"
        print(f"{r['model']:14} {cols}")
    by_name = {r["model"]: r for r in records}
    if "adaptive" in by_name and "fixed25" in by_name:
        ratio = by_name["adaptive"]["step_ms"] / by_name["fixed25"]["step_ms"]
        print(f"adaptive / fixed25 step time: {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
