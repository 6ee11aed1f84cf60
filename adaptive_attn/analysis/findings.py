"""The study's answers, one row per question and length, read from a sweep's `results.csv`: README's
Findings table is this table, and `tests/test_findings.py` recomputes it from the committed file."""

import numpy as np
import pandas as pd

from adaptive_attn.analysis.results import t_quantile

# (question, model, baseline, metric, kind): "diff" = model - baseline, "ratio" = model / baseline, paired by
# (seq_len, seed); "quality" is val accuracy on synthetic tasks and val loss on text
QUESTIONS = [
    ("quality vs fixed, equal compute", "adaptive10", "fixed10", "quality", "diff"),
    ("quality vs fixed, equal compute", "adaptive", "fixed25", "quality", "diff"),
    ("which sequence gets the budget", "adaptive10", "shuffled10", "quality", "diff"),
    ("upper bound of adapting", "oracle10", "fixed10", "quality", "diff"),
    ("convergence (AUC of val accuracy)", "adaptive10", "fixed10", "val_acc_auc", "diff"),
    ("speed vs fixed (step time)", "adaptive10", "fixed10", "step_ms", "ratio"),
    ("the budget binds: alphabet 2", "fixed10", "dense", "val_acc/counting/alphabet2", "diff"),
    ("the budget binds: alphabet 32", "fixed10", "dense", "val_acc/counting/alphabet32", "diff"),
    ("sparse vs dense (step time)", "fixed10", "dense", "step_ms", "ratio"),
    ("sparse vs dense (step time)", "fixed25", "dense", "step_ms", "ratio"),
]


def mean_ci(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    n = len(values)
    ci = values.std(ddof=1) * t_quantile(n - 1) / np.sqrt(n) if n > 1 else float("nan")
    return f"{values.mean():.3f} ± {ci:.3f} (n={n})" if n > 1 else f"{values.mean():.3f} (n=1)"


def findings(runs: pd.DataFrame) -> pd.DataFrame:
    """-> one row per question, data set and length with a paired comparison; plus how k follows difficulty."""
    ok = runs[runs["status"] == "ok"]
    rows = []
    for (data, seq_len), cell in ok.groupby(["data", "seq_len"]):
        for question, model, baseline, metric, kind in QUESTIONS:
            metric = ("val_acc" if data != "text_domains" else "val_loss") if metric == "quality" else metric
            if metric not in cell:
                continue
            a = cell[cell["model"] == model].set_index("seed")[metric]
            b = cell[cell["model"] == baseline].set_index("seed")[metric]
            paired = (a - b if kind == "diff" else a / b).dropna()
            if len(paired):
                sign = "-" if kind == "diff" else "/"
                rows.append((question, data, seq_len, f"{model} {sign} {baseline}", metric, mean_ci(paired)))
        spearman = "k_difficulty_spearman_counting"
        if spearman in cell:
            values = cell[cell["model"] == "adaptive10"][spearman]
            if values.notna().any():
                rows.append(("k adapts to difficulty", data, seq_len, "adaptive10", spearman, mean_ci(values)))
    return pd.DataFrame(rows, columns=["question", "data", "L", "comparison", "metric", "mean ± 95% CI"])
