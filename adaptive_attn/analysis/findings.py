"""The study's answers, one row per question and length, read from a sweep's `results.csv`: README's
Findings table is this table, and `tests/test_findings.py` recomputes it from the committed file.

    python -m adaptive_attn.analysis.findings results/exp3_cpu/results.csv [--readme README.md]
"""

import argparse
from pathlib import Path

import pandas as pd

from adaptive_attn.analysis.results import ci95

README_START = "<!-- findings table: generated from results/exp3_cpu/results.csv -->\n"
README_END = "\n<!-- end of findings table -->"

# (question, model, baseline, metric, kind): "diff" = model - baseline, "ratio" = model / baseline, paired by
# (seq_len, seed); "quality" is val accuracy on synthetic tasks and val loss on text; {data} is the data set
QUESTIONS = [
    ("quality vs fixed, equal compute", "adaptive10", "fixed10", "quality", "diff"),
    ("quality vs fixed, equal compute", "adaptive", "fixed25", "quality", "diff"),
    ("quality vs fixed, equal compute", "adaptive_topp", "fixed25", "quality", "diff"),
    ("quality vs fixed, equal compute", "adaptive10_lr30", "fixed10", "quality", "diff"),
    ("a policy that learns faster", "adaptive10_lr30", "adaptive10", "quality", "diff"),
    ("which sequence gets the budget", "adaptive10", "shuffled10", "quality", "diff"),
    ("which sequence gets the budget", "adaptive", "shuffled", "quality", "diff"),
    ("which sequence gets the budget", "adaptive10_lr30", "shuffled10_lr30", "quality", "diff"),
    ("upper bound of adapting", "oracle10", "fixed10", "quality", "diff"),
    ("upper bound of adapting", "oracle", "fixed25", "quality", "diff"),
    ("where adapting moves keys: alphabet 2", "adaptive10", "fixed10", "val_acc/{data}/alphabet2", "diff"),
    ("where adapting moves keys: alphabet 32", "adaptive10", "fixed10", "val_acc/{data}/alphabet32", "diff"),
    ("where adapting moves keys: alphabet 2", "adaptive10_lr30", "fixed10", "val_acc/{data}/alphabet2", "diff"),
    ("where adapting moves keys: alphabet 32", "adaptive10_lr30", "fixed10", "val_acc/{data}/alphabet32", "diff"),
    ("convergence (AUC of val accuracy)", "adaptive10", "fixed10", "val_acc_auc", "diff"),
    ("speed vs fixed (step time)", "adaptive10", "fixed10", "step_ms", "ratio"),
    ("the budget binds: alphabet 2", "fixed10", "dense", "val_acc/{data}/alphabet2", "diff"),
    ("the budget binds: alphabet 4", "fixed10", "dense", "val_acc/{data}/alphabet4", "diff"),
    ("the budget binds: alphabet 32", "fixed10", "dense", "val_acc/{data}/alphabet32", "diff"),
    ("sparse vs dense (quality)", "fixed10", "dense", "quality", "diff"),
    ("sparse vs dense (quality)", "fixed25", "dense", "quality", "diff"),
    ("sparse vs dense (quality)", "fixed50", "dense", "quality", "diff"),
    ("sparse vs dense (quality)", "fixed75", "dense", "quality", "diff"),
    ("sparse vs dense (step time)", "fixed10", "dense", "step_ms", "ratio"),
    ("sparse vs dense (step time)", "fixed25", "dense", "step_ms", "ratio"),
]

# the questions that also get a row over all lengths of a data set
POOLED = ("quality vs fixed, equal compute", "which sequence gets the budget")
# the arms whose k varies per sequence, for how k follows difficulty and content (the shuffled ones: the null)
ADAPTIVE_ARMS = (
    "adaptive10",
    "adaptive10_lr30",
    "adaptive",
    "adaptive_topp",
    "oracle10",
    "oracle",
    "shuffled10",
    "shuffled10_lr30",
    "shuffled",
)


def mean_ci(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    n = len(values)
    if n == 1:
        return f"{values.mean():.3f} (n=1)"
    return f"{values.mean():.3f} ± {ci95(values.std(ddof=1), n):.3f} (n={n})"


def paired(runs: pd.DataFrame, model: str, baseline: str, metric: str, kind: str) -> pd.Series:
    """model - baseline ("diff") or model / baseline ("ratio") of `metric`, paired by (length, seed)."""
    if metric not in runs:
        return pd.Series(dtype=float)
    a = runs[runs["model"] == model].set_index(["seq_len", "seed"])[metric]
    b = runs[runs["model"] == baseline].set_index(["seq_len", "seed"])[metric]
    return (a - b if kind == "diff" else a / b).dropna()


def findings(runs: pd.DataFrame) -> pd.DataFrame:
    """-> one row per question, data set and length with a paired comparison; plus how k follows difficulty
    (Spearman's rho between a sequence's k and its alphabet size) and content (text: the mean k of
    repetitive logs over that of prose); the shuffled control's figures are the null. The questions in
    `POOLED` also get a row over every length of a data set (L "all", pairs by length and seed) where
    more than one length has pairs: the mean difference over the lengths studied, with more pairs."""
    ok = runs[runs["status"] == "ok"]
    rows = []
    for data, data_runs in ok.groupby("data"):
        quality = "val_acc" if data != "text_domains" else "val_loss"
        for seq_len, cell in data_runs.groupby("seq_len"):
            for question, model, baseline, metric, kind in QUESTIONS:
                metric = quality if metric == "quality" else metric.format(data=data)
                differences = paired(cell, model, baseline, metric, kind)
                if len(differences):
                    sign = "-" if kind == "diff" else "/"
                    rows.append((question, data, seq_len, f"{model} {sign} {baseline}", metric, mean_ci(differences)))
            rows += k_rows(cell, data, seq_len)
        for question, model, baseline, metric, kind in (q for q in QUESTIONS if q[0] in POOLED):
            metric = quality if metric == "quality" else metric
            differences = paired(data_runs, model, baseline, metric, kind)
            if len(differences) and differences.index.get_level_values(0).nunique() > 1:
                rows.append((question, data, "all", f"{model} - {baseline}", metric, mean_ci(differences)))
    return pd.DataFrame(rows, columns=["question", "data", "L", "comparison", "metric", "mean ± 95% CI"])


def k_rows(cell: pd.DataFrame, data: str, seq_len: int) -> list[tuple]:
    """How k follows difficulty (synthetic tasks) and content (text) in one (data, length) cell, per adaptive
    arm."""
    rows = []
    spearman = f"k_difficulty_spearman_{data}"
    for model in ADAPTIVE_ARMS if spearman in cell else ():
        values = cell[cell["model"] == model][spearman]
        if values.notna().any():
            rows.append(("k adapts to difficulty", data, seq_len, model, spearman, mean_ci(values)))
    for model in ADAPTIVE_ARMS if "k_mean_domain_prose" in cell else ():
        runs_of = cell[cell["model"] == model]
        values = runs_of["k_mean_domain_repetitive"] / runs_of["k_mean_domain_prose"]
        if values.notna().any():
            rows.append(("k adapts to content", data, seq_len, model, "k repetitive / k prose", mean_ci(values)))
    return rows


def write_into_readme(table: str, readme: Path) -> None:
    """Replace the text between README's findings markers with table (markdown)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme}: no findings markers ({README_START.strip()} ... {README_END.strip()})")
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + table + text[end:])


def main() -> None:
    p = argparse.ArgumentParser(description="The study's findings table from a sweep's results.csv.")
    p.add_argument("results_csv")
    p.add_argument("--readme", type=Path, help="write the table between the findings markers of this file")
    args = p.parse_args()
    table = findings(pd.read_csv(args.results_csv)).to_markdown(index=False)
    if args.readme:
        write_into_readme(table, args.readme)
    print(table)


if __name__ == "__main__":
    main()
