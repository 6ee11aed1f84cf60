"""Model-level benchmark: training-step time of each model variant, timed in one process, in turns.

Prints step time, tokens/s and the ratio to the first model (the baseline, `dense` by default), and
adaptive / fixed25 (adaptive10 / fixed10) when both are present (equal compute: the adaptive target is
0.25, 0.1). A ratio is the median of the per-round ratios (the models take turns, round by round), with
a distribution-free 95% interval for that median. With
`--breakdown`, each model's step split into its components (forward + backward; profiled steps, so
slower than the timed ones), and for every sparse model Amdahl's bound: the ratio to dense it would
reach if everything but attention cost what it costs in the dense step, given its sparse attention op
(`bound`) or an op spending dense attention's time per attended pair (`floor`).

    GOMP_SPINCOUNT=0 python benchmarks/throughput.py --models dense fixed25 adaptive --seq-len 2048 --batch 2 \
        --overrides experiment=research_text --breakdown

An override `key=value` applies to every model whose config has the key, null-valued or not (block sizes skip
dense); `name:key=value` applies to that model only. An override that reaches no model is an error.
"""

import argparse
import json

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timing import median, median_interval, paired_ratios, take_turns, timed_call
from tqdm.auto import tqdm

from adaptive_attn.config import CONF_DIR, validate
from adaptive_attn.lit.breakdown import profile_breakdown
from adaptive_attn.lit.module import split_batch
from adaptive_attn.nn.component import COMPONENTS, component
from adaptive_attn.process import apply_training_settings, device_name

ABSENT = object()  # `has_key`'s default for OmegaConf.select: returned only for a key the config lacks


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def named_model(override: str) -> str | None:
    """The model a `name:key=value` override is for; None for `key=value`, which is for every model."""
    return override.split(":", 1)[0] if ":" in override.split("=", 1)[0] else None


def model_overrides(name: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to model `name`: its own (`name:key=value`), group choices, and keys its
    config has (whatever their value there, null included)."""
    own = [o.split(":", 1)[1] for o in overrides if named_model(o) == name]
    general = [o for o in overrides if named_model(o) is None]
    groups = [o for o in general if "." not in o.split("=", 1)[0]]
    cfg = compose_train([f"model={name}", *groups])
    keys = [o for o in general if "." in o.split("=", 1)[0] and has_key(cfg, o.split("=", 1)[0])]
    return groups + keys + own


def has_key(cfg, key: str) -> bool:
    """Whether `cfg` has `key` (dotted), null-valued or not."""
    return OmegaConf.select(cfg, key, default=ABSENT) is not ABSENT


def build_model(name: str, used: list[str]):
    """Model `name` under the overrides that apply to it (`model_overrides`) -> (model, its config)"""
    cfg = compose_train([f"model={name}", *used])
    validate(cfg)  # e.g. a budget that selects nothing beyond each query block's own keys
    return instantiate(cfg.model), cfg


def training_step(model, batch, calibrate: int, sparse_stage: bool = True, bf16: bool = False):
    """-> a function running one forward + backward + AdamW step, every DSA layer in its sparse stage (or
    in the dense warm-up, where the indexer trains on full causal rows).

    First `calibrate` forward passes let adaptive budgets reach their target (their dual ascent runs
    after each step), so the timing compares equal compute. The optimizer runs with lr 0: the step does
    all its arithmetic, but the weights (and with them MoE routing and the adaptive budgets) stay where
    calibration left them instead of drifting on the one repeated batch. `bf16`: under bf16 autocast, as
    `trainer.precision=bf16-mixed` trains (else in the weights' own dtype).
    """
    model.set_sparse_stage(sparse_stage)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    inputs, targets = split_batch(batch)
    device = inputs.device
    mixed = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), mixed:
        for _ in range(calibrate if sparse_stage and any(True for _ in model.sparse_layers()) else 0):
            _, aux = model(inputs)
            model.after_training_step(aux["sparsity"])

    def forward_backward() -> dict:
        with mixed:
            logits, aux = model(inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        (loss + aux["balance_loss"] + aux.get("indexer_kl", 0.0)).backward()
        with component("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return aux

    def step() -> tuple[float, float]:
        """-> (ms, equivalent keep, mean over the layers)"""
        ms, aux = timed_call(forward_backward, device)
        model.after_training_step(aux.get("sparsity"))
        keep = [float(layer["equivalent_keep"]) for layer in aux.get("sparsity", [])] or [1.0]
        share = [float(layer["pairs_share"]) for layer in aux.get("sparsity", [])] or [1.0]
        return ms, sum(keep) / len(keep), sum(share) / len(share)

    return step


def median_breakdowns(steps, rounds: int) -> list[dict[str, float]]:
    """Each model's breakdown, median of `rounds` profiled steps taken in turns."""
    runs = take_turns([lambda step=step: profile_breakdown(step) for step in steps], rounds, warmup=0)
    names = ("total", "rest", *COMPONENTS)
    return [{n: median([r.get(n, 0.0) for r in model_runs]) for n in names} for model_runs in runs]


SAME_COMPUTE = {"adaptive": "fixed25", "adaptive10": "fixed10"}  # an adaptive budget and the fixed one of its target


def paired_ratio(values: list[float], baseline: list[float]) -> tuple[float, list[float]]:
    """Step times round by round -> the median of their per-round ratios, and its 95% interval."""
    ratios = paired_ratios(values, baseline)
    return round(median(ratios), 3), [round(r, 3) for r in median_interval(ratios)]


def amdahl(records: list[dict]) -> None:
    """Amdahl's bound of every sparse model against dense, from their breakdowns (in place)."""
    dense = next((r for r in records if r["model"] == "dense"), None)
    if dense is None or "breakdown_ms" not in dense:
        return
    attention = dense["breakdown_ms"]["dense_attention"] / dense["breakdown_ms"]["total"]  # its share of a step
    for r in records:
        if r["model"] != "dense" and "breakdown_ms" in r:
            op = r["breakdown_ms"]["sparse_attention"] / dense["breakdown_ms"]["dense_attention"]
            r["amdahl_bound"] = round(1 - attention + attention * op, 3)
            r["amdahl_floor"] = round(1 - attention + attention * r["pairs_share"], 3)
    dense["attention_share"] = round(attention, 3)


def interval_text(interval: list[float]) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def print_tables(records: list[dict], args) -> None:
    where = f"{records[0]['device']} {args.dtype}"
    print(f"\n{where} seq_len={args.seq_len} batch={args.batch} stage={args.stage} {args.overrides}")
    print(
        f"{'model':14} {'step ms':>9} {'tokens/s':>9} {'eq. keep':>9} {'pairs':>7} {'vs ' + records[0]['model']:>10}"
        f" {'95% interval':>14} {'bound':>7} {'floor':>7}"
    )
    for r in records:
        cols = f"{r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['equivalent_keep']:>9.3f} {r['pairs_share']:>7.3f}"
        cols += f" {r['ratio_vs_baseline']:>10.3f} {interval_text(r['ratio_interval']):>14}"
        cols += f" {r.get('amdahl_bound', float('nan')):>7.3f} {r.get('amdahl_floor', float('nan')):>7.3f}"
        print(f"{r['model']:14} {cols}")
    for r in (r for r in records if "vs_fixed" in r):
        vs = r["vs_fixed"]
        print(f"{r['model']} / {vs['model']} step time: {vs['ratio']:.3f} {interval_text(vs['interval'])}")
    print("95% interval: of the median of the per-round ratios (distribution-free; the whole range under 6 rounds)")
    if "breakdown_ms" not in records[0]:
        return
    names = ["total", *[n for n in (*COMPONENTS, "rest") if any(r["breakdown_ms"][n] for r in records)]]
    print("\nbreakdown (profiled steps): share of each model's step, and ms")
    print(f"{'model':14} " + " ".join(f"{n[:12]:>12}" for n in names))
    for r in records:
        ms = r["breakdown_ms"]
        cells = [f"{ms['total']:>10.0f}ms"] + [f"{ms[n] / ms['total']:>6.1%} {ms[n]:>4.0f}" for n in names[1:]]
        print(f"{r['model']:14} " + " ".join(f"{c:>12}" for c in cells))
    by_name = {r["model"]: r for r in records}
    if "attention_share" in by_name.get("dense", {}):
        print(f"dense attention's share of a dense step: {by_name['dense']['attention_share']:.3f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dense", "fixed25", "fixed50", "adaptive", "adaptive_topp"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--calibrate", type=int, default=100, help="forward passes for adaptive budgets to reach target")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides: key=value, or model:key=value")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: mixed, autocast")
    p.add_argument("--stage", choices=["sparse", "warmup"], default="sparse", help="the sparse models' training stage")
    p.add_argument("--breakdown", action="store_true", help="also profile each model's step by component")
    p.add_argument("--breakdown-rounds", type=int, default=3)
    p.add_argument("--json", help="write the records to this path")
    args = p.parse_args()
    if args.breakdown and args.device != "cpu":
        p.error("--breakdown profiles CPU time: on a GPU it would time kernel launches, not kernels")
    return args


def check_overrides(models: list[str], overrides: list[str], applied: list[list[str]]) -> None:
    """Exit with one line, before any model is built, on an override that would apply to no model: a key no
    model has (mistyped, say), or `name:key=value` for a model not in `models`."""
    named = [named_model(o) for o in overrides]
    if strangers := [name for name in named if name is not None and name not in models]:
        raise SystemExit(f"--overrides: {', '.join(strangers)} is not one of --models {' '.join(models)}")
    unused = [o for o, name in zip(overrides, named) if name is None and not any(o in used for used in applied)]
    if unused:
        keys = ", ".join(o.split("=", 1)[0] for o in unused)
        raise SystemExit(f"--overrides: no model of --models {' '.join(models)} has the key {keys}")


def build_steps(args, device: torch.device) -> tuple[list, list[list[str]]]:
    """-> every model's training step (on `device`), and the overrides each took."""
    applied = [model_overrides(name, [f"seq_len={args.seq_len}", *args.overrides]) for name in args.models]
    check_overrides(args.models, args.overrides, applied)
    steps = []
    sparse_stage, bf16 = args.stage == "sparse", args.dtype == "bfloat16"
    for name, used in zip(tqdm(args.models, desc="build + calibrate"), applied):
        # same seed for every model: shared weights (budgets draw no random numbers) and the same batch,
        # so MoE routing, and with it the expert GEMM sizes, differ only through attention
        torch.manual_seed(args.seed)
        model, cfg = build_model(name, used)
        tokens = torch.randint(0, cfg.data.vocab_size, (args.batch, args.seq_len + 1)).to(device)
        steps.append(training_step(model.to(device), {"tokens": tokens}, args.calibrate, sparse_stage, bf16))
    return steps, applied


def make_records(args, timed: list[list], applied: list[list[str]], device: torch.device, process: dict) -> list[dict]:
    """Each model's timed rounds [(ms, keep, share)] -> its record, with its ratios to the baseline and, for
    an adaptive budget, to the fixed budget of its target; `process`: the process settings it ran under."""
    rounds = {name: [ms for ms, _, _ in t] for name, t in zip(args.models, timed)}  # step ms, round by round
    records = []
    for name, t, used in zip(args.models, timed, applied):
        ms = median(rounds[name])
        record = {
            "model": name,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "step_ms": round(ms, 2),
            "tokens_per_s": round(args.batch * args.seq_len / ms * 1000, 1),
            # adaptive budgets move around their target while they train
            "equivalent_keep": round(sum(k for _, k, _ in t) / len(t), 4),
            "pairs_share": round(sum(s for _, _, s in t) / len(t), 4),
            "stage": args.stage,
            "device": device_name(device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "process": process,
            "overrides": used,
            "round_ms": [round(ms, 2) for ms in rounds[name]],
        }
        record["ratio_vs_baseline"], record["ratio_interval"] = paired_ratio(rounds[name], rounds[args.models[0]])
        fixed = SAME_COMPUTE.get(name)
        if fixed in rounds:
            ratio, interval = paired_ratio(rounds[name], rounds[fixed])
            record["vs_fixed"] = {"model": fixed, "ratio": ratio, "interval": interval}
        records.append(record)
    return records


def main() -> None:
    args = parse_args()
    process = apply_training_settings()  # as the training entry point does
    device = torch.device(args.device)
    steps, applied = build_steps(args, device)
    timed = take_turns(steps, args.repeats, args.warmup, desc="rounds")  # [(ms, keep, share)] per model
    records = make_records(args, timed, applied, device, process)
    if args.breakdown:
        for record, ms in zip(records, median_breakdowns(steps, args.breakdown_rounds)):
            record["breakdown_ms"] = {k: round(v, 2) for k, v in ms.items()}
        if args.stage == "sparse":  # in the warm-up, attention is dense in every model
            amdahl(records)
    print_tables(records, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
