"""Sweep analysis: load every run's summary.json into a DataFrame, aggregate over seeds with 95%
confidence intervals, compare adaptive and fixed budgets pairwise (same seq_len and seed), and plot."""

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from adaptive_attn.data.atomic import write_atomically
from adaptive_attn.data.synthetic import TASKS

METRICS = [
    "val_loss",
    "val_acc",
    "test_loss",
    "test_acc",
    "tokens_per_s",
    "step_ms",
    "peak_mem_bytes",
    "equivalent_keep",
    "pairs_share",
    "attn_mass_recall",
    "attn_mass_recall_random",
    "needed_recall",
    "val_acc_auc",
    "steps_to_acc_0.9",
    "wall_s_to_acc_0.9",
    *(f"k_difficulty_spearman_{task}" for task in TASKS),
]
TABLE_METRICS = [m for m in METRICS if m not in ("test_loss", "test_acc", "step_ms")]
COMPARED = ["val_loss", "val_acc", "val_acc_auc", "steps_to_acc_0.9", "step_ms"]

# two-sided 95% Student-t quantiles by degrees of freedom (normal beyond the table)
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    25: 2.060,
    30: 2.042,
}


def t_quantile(dof: int) -> float:
    if dof < 1:
        return float("nan")
    return _T975.get(dof) or _T975[max(d for d in _T975 if d <= dof)] if dof <= 30 else 1.96


def ci95(std, n):
    """Half-width of the 95% Student-t interval of a mean of n values with sample deviation std (numbers,
    or Series / DataFrames of them)."""
    t = n.map(lambda c: t_quantile(c - 1)) if isinstance(n, (pd.Series, pd.DataFrame)) else t_quantile(n - 1)
    return std * t / np.sqrt(n)


def load_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run (every summary.json below `sweep_dir`), scalar fields only, plus `run_dir`. An
    unreadable summary is skipped with a warning that names it."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            warnings.warn(f"skipping {path}: not a readable summary ({err})", stacklevel=2)
            continue
        row = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
        row.update({f"val_{name}": value for name, value in summary.get("val_slices", {}).items()})
        row["run_dir"] = str(path.parent)
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no summary.json below {sweep_dir}")
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame, by=("model", "seq_len"), metrics=METRICS) -> pd.DataFrame:
    """Mean, std, n and 95% CI half-width over seeds of each metric, for successful runs."""
    ok = runs[runs["status"] == "ok"]
    metrics = [m for m in metrics if m in ok and ok[m].notna().any()]
    grouped = ok.groupby(list(by))[metrics]
    mean, std, n = grouped.mean(), grouped.std(ddof=1), grouped.count()
    table = pd.concat({"mean": mean, "ci95": ci95(std, n), "std": std, "n": n}, axis=1)
    return table.swaplevel(axis=1).sort_index(axis=1)


def paired_comparison(runs: pd.DataFrame, model: str, baseline: str, metric: str) -> pd.DataFrame:
    """model - baseline on `metric`, paired by (seq_len, seed): mean difference and 95% CI per seq_len."""
    ok = runs[runs["status"] == "ok"]
    a = ok[ok["model"] == model].set_index(["seq_len", "seed"])[metric]
    b = ok[ok["model"] == baseline].set_index(["seq_len", "seed"])[metric]
    diff = (a - b).dropna().groupby(level="seq_len")
    out = pd.DataFrame({"mean_diff": diff.mean(), "n": diff.count(), "std": diff.std(ddof=1)})
    out["ci95"] = ci95(out["std"], out["n"])
    out.insert(0, "comparison", f"{model} - {baseline}")
    out.insert(1, "metric", metric)
    return out.reset_index()


def load_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """The validation curve of every finished run (summary.json's val_curve): one row per validation."""
    frames = []
    for _, run in runs[runs["status"] == "ok"].iterrows():
        curve = json.loads((Path(run["run_dir"]) / "summary.json").read_text()).get("val_curve") or []
        if curve:
            frame = pd.DataFrame(curve)
            frame["model"], frame["seq_len"], frame["seed"] = run["model"], run["seq_len"], run["seed"]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def equal_compute_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, baseline) pairs that spend the same compute: every budget with a target keep against the
    fixed budget of that keep (adaptive vs fixed25, adaptive10 vs fixed10, oracle vs fixed25, ...), and the
    shuffled control against the adaptive budget it shuffles (its name's "shuffled" read as "adaptive":
    shuffled10_lr30 against adaptive10_lr30)."""
    ok = runs[runs["status"] == "ok"]
    fixed = (
        {round(k, 4): m for m, k in ok.dropna(subset=["keep"]).groupby("model")["keep"].first().items()}
        if "keep" in ok
        else {}
    )
    targets = ok.dropna(subset=["target"]).groupby("model")["target"].first() if "target" in ok else pd.Series()
    pairs = [(m, fixed[round(t, 4)]) for m, t in targets.items() if round(t, 4) in fixed]
    shuffles = {m: m.replace("shuffled", "adaptive", 1) for m in targets.index if m.startswith("shuffled")}
    pairs += [(m, adaptive) for m, adaptive in shuffles.items() if adaptive in targets]
    return pairs


def slice_table(runs: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Mean over seeds of every validation slice whose column starts with `prefix` (e.g. "val_acc/" for
    accuracy by task and difficulty, "val_needed_recall/" for needed-key recall), per model and length."""
    columns = sorted(c for c in runs if c.startswith(prefix) and "/layer" not in c and "/pos" not in c)
    if not columns:
        return pd.DataFrame()
    table = runs[runs["status"] == "ok"].groupby(["model", "seq_len"])[columns].mean()
    return table.rename(columns=lambda c: c.removeprefix(prefix)).round(3)


def coverage(runs: pd.DataFrame) -> pd.DataFrame:
    """What ran: the seeds of the finished runs of each (data, model) at each seq_len, e.g. "0,1,2", with
    the runs that did not finish counted beside them ("0,1 (1 not ok)"); empty where nothing ran."""
    rows = ["data", "model"] if "data" in runs else ["model"]

    def seeds(cell: pd.DataFrame) -> str:
        ok = cell["status"] == "ok"
        text = ",".join(str(s) for s in sorted(int(s) for s in cell.loc[ok, "seed"]))
        return text + (f" ({(~ok).sum()} not ok)" if (~ok).any() else "")

    table = runs.groupby([*rows, "seq_len"])[["seed", "status"]].apply(seeds).unstack("seq_len")
    return table.fillna("").rename_axis(columns=None).reset_index()


def compute_spent(runs: pd.DataFrame) -> pd.DataFrame:
    """What the runs cost: job-hours (the sum of their `wall_s`, every process that worked on a run) of each
    (data, model) at each seq_len, then of each data set and of all; runs that did not finish count too."""
    rows = ["data", "model"] if "data" in runs else ["model"]
    hours = runs.assign(job_hours=runs["wall_s"].fillna(0) / 3600)
    table = hours.pivot_table(index=rows, columns="seq_len", values="job_hours", aggfunc="sum")
    table["all"] = table.sum(axis=1)
    parts = [table]
    if len(rows) == 2:
        per_data = table.groupby(level=0).sum(min_count=1)
        per_data.index = pd.MultiIndex.from_product([per_data.index, ["all"]])
        parts.append(per_data)
    all_runs = table.sum(min_count=1).to_frame(("all", "all") if len(rows) == 2 else "all").T
    table = pd.concat([*parts, all_runs]).round(2)
    return table.astype(object).where(table.notna(), "").rename_axis(index=rows, columns=None).reset_index()


RUN_KEYS = ("data", "model", "seq_len", "seed")  # what names a run in a sweep (data where recorded)


def load_k_vs_difficulty(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-sequence k and difficulty (synthetic tasks) or text domain of every run that recorded them
    (k_vs_difficulty.csv), each row tagged with its run's `RUN_KEYS`."""
    keys = [c for c in RUN_KEYS if c in runs]
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / "k_vs_difficulty.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame[keys] = run[keys].tolist()
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def format_table(agg: pd.DataFrame, metrics=TABLE_METRICS) -> pd.DataFrame:
    """'mean ± ci95 (n)' strings, one column per metric."""
    table = pd.DataFrame(index=agg.index)
    for m in metrics:
        if m not in agg.columns.get_level_values(0):
            continue
        scale = 1 / 2**20 if m == "peak_mem_bytes" else 1
        name = "peak_mem_MiB" if m == "peak_mem_bytes" else m
        mean, ci, n = agg[(m, "mean")] * scale, agg[(m, "ci95")] * scale, agg[(m, "n")]
        digits = 0 if m in ("tokens_per_s", "peak_mem_bytes") else 3
        table[name] = [
            "–" if k == 0 else f"{a:.{digits}f} (n=1)" if k == 1 else f"{a:.{digits}f} ± {c:.{digits}f} (n={k})"
            for a, c, k in zip(mean, ci.fillna(0), n)
        ]
    return table


def all_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Every equal-compute pair, then every model against dense, on each metric of COMPARED that the runs
    have (`paired_comparison` rows; empty when nothing pairs)."""
    models = set(runs["model"])
    pairs = equal_compute_pairs(runs) + [(m, "dense") for m in sorted(models - {"dense"}) if "dense" in models]
    metrics = [m for m in COMPARED if m in runs and runs[m].notna().any()]
    comparisons = [paired_comparison(runs, m, b, metric) for m, b in pairs for metric in metrics]
    comparisons = [c for c in comparisons if len(c)]
    return pd.concat(comparisons) if comparisons else pd.DataFrame()


def result_sections(runs: pd.DataFrame) -> list[str]:
    """summary.md's sections on the finished runs (markdown lines): means with CIs, paired differences,
    the findings table, where each adaptive run gives its keys, and accuracy and recall by slice."""
    from adaptive_attn.analysis.findings import findings
    from adaptive_attn.analysis.policy import policy_tables

    lines = ["## mean ± 95% CI over seeds", "", format_table(aggregate(runs)).to_markdown(), ""]
    comparisons = all_comparisons(runs)
    if len(comparisons):
        title = "## paired differences (same seq_len and seed): equal-compute pairs, then each model against dense"
        lines += [title, "", comparisons.round(4).to_markdown(index=False), ""]
    answers = findings(runs)
    if len(answers):
        lines += ["## findings (README's table)", "", answers.to_markdown(index=False), ""]
    for task, table in policy_tables(runs).items():
        title = f"## where each run gives its keys ({task}): k by difficulty, accuracy minus its fixed pair's"
        lines += [title, "", table.to_markdown(index=False), ""]
    for title, prefix in (("accuracy by slice", "val_acc/"), ("needed-key recall by slice", "val_needed_recall/")):
        table = slice_table(runs, prefix)
        if not table.empty:
            lines += [f"## {title} (mean over seeds)", "", table.to_markdown(), ""]
    return lines


def analyse(sweep_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> pd.DataFrame:
    """Write results.csv (per run), summary.md (mean ± CI, paired comparisons) and plots into out_dir."""
    runs = load_runs(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the lanes of a grid that share a sweep directory each write these when they end
    write_atomically(out_dir / "results.csv", lambda tmp: runs.to_csv(tmp, index=False))
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        ", ".join(f"{n} {status}" for status, n in runs["status"].value_counts().items()),
        "",
        "## what ran (seeds of the finished runs)",
        "",
        coverage(runs).to_markdown(index=False),
        "",
        f"## what it cost: {len(runs)} jobs, {runs['wall_s'].fillna(0).sum() / 3600:.2f} job-hours (sum of wall_s)",
        "",
        compute_spent(runs).to_markdown(index=False),
        "",
    ]
    if (runs["status"] == "ok").any():
        lines += result_sections(runs)
        if plots:
            from adaptive_attn.analysis.plots import plot_sweep

            plot_sweep(runs, out_dir)
    failed = runs[runs["status"] != "ok"]
    if len(failed):
        lines += [
            "## runs that did not finish",
            "",
            failed[[c for c in ("run_dir", "status", "steps", "error") if c in failed]].to_markdown(index=False),
            "",
        ]
    write_atomically(out_dir / "summary.md", lambda tmp: tmp.write_text("\n".join(lines)))
    return runs
