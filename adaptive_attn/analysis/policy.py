"""Where each adaptive run gives its keys, and what that buys against the fixed budget of the same compute
and seed. A mean over seeds hides a policy that some seeds learn and others do not: Spearman's rho of
-0.9 in two seeds and +0.8 in a third averages to about -0.3, which describes none of them."""

from pathlib import Path

import pandas as pd

from adaptive_attn.analysis.results import equal_compute_pairs
from adaptive_attn.data.synthetic import TASKS
from adaptive_attn.lit.metrics import slice_name


def fixed_pairs(runs: pd.DataFrame) -> dict[str, str]:
    """model -> the fixed budget whose keep is its target (the first of its equal-compute pairs)."""
    pairs: dict[str, str] = {}
    for model, baseline in equal_compute_pairs(runs):
        pairs.setdefault(model, baseline)
    return pairs


def policy_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """-> per synthetic task, one row per run of a budget with a target (adaptive, oracle, shuffled) that
    recorded `k_vs_difficulty.csv`: Spearman's rho between a sequence's k and its difficulty, the mean k
    (the layout's columns: tokens in token mode) at the smallest and the largest difficulty, and val
    accuracy minus that of the run's fixed pair (same data, length and seed) overall and on those two
    difficulties' slices (NaN where the pair did not run)."""
    ok = runs[runs["status"] == "ok"]
    fixed_of = fixed_pairs(ok)
    same = [c for c in ("data", "seq_len", "seed") if c in ok]
    rows: dict[str, list[dict]] = {}
    for _, run in ok.iterrows():
        path = Path(run["run_dir"]) / "k_vs_difficulty.csv"
        frame = pd.read_csv(path) if run["model"] in fixed_of and path.exists() else pd.DataFrame()
        if "difficulty" not in frame:  # not adaptive, or text (k by domain)
            continue
        pair = ok[(ok["model"] == fixed_of[run["model"]]) & (ok[same] == run[same]).all(axis=1)]
        for task, seqs in frame.dropna(subset=["difficulty"]).groupby("task"):
            k_by_difficulty = seqs.groupby("difficulty")["k"].mean()
            ends = {
                d: slice_name(TASKS.index(task), int(d))
                for d in (k_by_difficulty.index.min(), k_by_difficulty.index.max())
            }
            row = {"model": run["model"], "L": run["seq_len"], "seed": run["seed"]}
            constant = seqs["k"].nunique() < 2  # no rank order: rho is undefined
            row["rho"] = float("nan") if constant else seqs["difficulty"].corr(seqs["k"], method="spearman")
            row.update({f"k {name}": k_by_difficulty[d] for d, name in ends.items()})
            for metric in ["val_acc", *(f"val_acc/{name}" for name in ends.values())]:
                theirs = pair[metric].iloc[0] if len(pair) and metric in pair else float("nan")
                row[f"{metric} - fixed"] = run.get(metric, float("nan")) - theirs
            rows.setdefault(task, []).append(row)
    return {task: pd.DataFrame(r).sort_values(["model", "L", "seed"]).round(3) for task, r in sorted(rows.items())}
