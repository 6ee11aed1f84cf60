"""Can a budget bind? The research protocol's check, read from the data alone, before paying for a grid.

Every scored position of a synthetic sample needs its earlier positions of the same `need_id`: one on
recall, every earlier occurrence of its symbol on counting, every earlier ballot for its key on votes. A
counting label stops at `count_cap`, so a position with at least that many earlier occurrences (a
*saturated* label) is answered by any cap of them; a vote share has no cap.
A fixed budget of k tokens (token mode) keeps each query's own position and the `sink_tokens` first
positions (the task token, which no query needs), which leaves room for k - 1 - sinks others; a query
with at most k positions up to itself sees them all. A position whose need exceeds its room is *bound*:
no selection holds every key it needs, however good the indexer. Where no position is bound, budgets
cannot differ in what they let the model see.
The check reads the validation set, the sequences every run is scored on.

    python -m adaptive_attn.binding experiment=exp3_cpu_synthetic --lengths 64 128 256 512 \
        --keeps 0.1 0.25 0.5 --out results/exp3_cpu/counting/binding.md
"""

import argparse

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tqdm.auto import tqdm

from adaptive_attn.config import CONF_DIR, cfg_get
from adaptive_attn.data.synthetic import TASKS, needed_mask
from adaptive_attn.sparse.budget import budget_tokens


def position_needs(sample: dict, count_cap: int) -> pd.DataFrame:
    """One sample -> per scored position: its position t, the keys it needs, whether its label is saturated."""
    need_id, scored = torch.as_tensor(sample["need_id"])[None], torch.as_tensor(sample["target_mask"])[None]
    need = needed_mask(need_id, scored).sum(-1)[0].numpy()  # the keys needed-key recall counts
    counting = TASKS[int(sample["task"])] == "counting"
    saturated = counting & (need >= count_cap)
    t = np.flatnonzero(scored[0].numpy())
    needed = np.minimum(need, count_cap) if counting else need
    return pd.DataFrame({"t": t, "need": needed[t], "saturated": saturated[t]})


def bound_shares(needs: pd.DataFrame, k: int, sink_tokens: int) -> dict[str, float]:
    """Per-position needs (all of one task and difficulty) and a budget of k tokens -> the shares of positions
    whose label is saturated, that are bound, and that are bound with an unsaturated label."""
    room = np.where(needs["t"] + 1 <= k, np.inf, k - 1 - sink_tokens)
    bound = needs["need"] > room
    return {
        "saturated": float(needs["saturated"].mean()),
        "bound": float(bound.mean()),
        "bound_unsaturated": float((bound & ~needs["saturated"]).mean()),
    }


def binding_table(dataset, seq_len: int, keeps: list[float], samples: int, count_cap: int, sink_tokens: int):
    """The first `samples` samples of a synthetic dataset -> one row per (task, difficulty, keep)."""
    frames = []
    for i in range(min(samples, len(dataset))):
        sample = {key: np.asarray(value) for key, value in dataset[i].items()}
        task, difficulty = TASKS[int(sample["task"])], int(sample["difficulty"])
        frames.append(position_needs(sample, count_cap).assign(task=task, difficulty=difficulty))
    needs = pd.concat(frames)
    rows = []
    for (task, difficulty), group in needs.groupby(["task", "difficulty"]):
        for keep in keeps:
            k = budget_tokens(keep, seq_len)
            shares = bound_shares(group, k, sink_tokens)
            rows.append({"task": task, "difficulty": difficulty, "L": seq_len, "keep": keep, "k": k, **shares})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Share of positions a fixed budget binds, per task, difficulty and length.")
    p.add_argument("overrides", nargs="*", help="Hydra overrides choosing the data (experiment=exp3_cpu_synthetic)")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75])
    p.add_argument("--samples", type=int, default=512, help="validation samples per length")
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    for name, values, ok, allowed in [
        ("--lengths", args.lengths, lambda v: v >= 2, ">= 2"),
        ("--keeps", args.keeps, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("--samples", [args.samples], lambda v: v >= 1, ">= 1"),
    ]:
        for value in values:
            if not ok(value):
                raise SystemExit(f"error: {name} {value} is invalid: must be {allowed}")
    tables = []
    for seq_len in tqdm(args.lengths, desc="lengths"):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*args.overrides, f"seq_len={seq_len}"])
        if not cfg.data._target_.endswith("SyntheticDataModule"):
            raise SystemExit(f"error: data._target_={cfg.data._target_} is invalid: the check needs a synthetic task")
        data = instantiate(cfg.data)
        sinks = cfg_get(cfg, "model.sparse.sink_tokens") or 0
        cap = cfg.data.get("count_cap", 15)
        tables.append(binding_table(data.build()["val"], seq_len, args.keeps, args.samples, cap, sinks))
    table = pd.concat(tables).round(3).to_markdown(index=False)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
