"""Where each adaptive run gives its keys, and what that buys against the fixed budget of the same compute
and seed. A mean over seeds hides a policy that some seeds learn and others do not: Spearman's rho of
-0.9 in two seeds and +0.8 in a third averages to about -0.3, which describes none of them."""

import pandas as pd

from adaptive_attn.analysis.results import RUN_KEYS, equal_compute_pairs, load_k_vs_difficulty
from adaptive_attn.data.synthetic import TASKS
from adaptive_attn.lit.metrics import slice_name


def fixed_pairs(runs: pd.DataFrame) -> dict[str, str]:
    """model -> the fixed budget whose keep is its target (its equal-compute pair that has a keep)."""
    fixed = set(runs.dropna(subset=["keep"])["model"]) if "keep" in runs else set()
    return {model: baseline for model, baseline in equal_compute_pairs(runs) if baseline in fixed}


def policy_tables(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """-> per synthetic task, one row per run of a budget with a target (adaptive, oracle, shuffled) that
    recorded `k_vs_difficulty.csv`: Spearman's rho between a sequence's k and its difficulty, the mean k
    (the layout's columns: tokens in token mode) at the smallest and the largest difficulty, and val
    accuracy minus that of the run's fixed pair (same data, length and seed) overall and on those two
    difficulties' slices (NaN where the pair did not run)."""
    ok = runs[runs["status"] == "ok"]
    fixed_of = fixed_pairs(ok)
    k = load_k_vs_difficulty(ok[ok["model"].isin(fixed_of)])
    if "difficulty" not in k:  # no adaptive runs, or text only (k by domain)
        return {}
    keys = [c for c in RUN_KEYS if c in ok]
    by_run = ok.set_index(keys)
    tables = {}
    for task, task_k in k.dropna(subset=["difficulty"]).groupby("task"):
        rows = []
        for key, seqs in task_k.groupby(keys):
            run = dict(zip(keys, key))
            pair_key = tuple(fixed_of[run["model"]] if c == "model" else v for c, v in run.items())
            pair = by_run.loc[pair_key] if pair_key in by_run.index else pd.Series(dtype=float)
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
                row[f"{metric} - fixed"] = by_run.loc[key].get(metric, float("nan")) - pair.get(metric, float("nan"))
            rows.append(row)
        tables[task] = pd.DataFrame(rows).sort_values(["model", "L", "seed"]).round(3)
    return tables
