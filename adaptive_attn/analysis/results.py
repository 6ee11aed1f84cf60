"""Sweep analysis: load every run's summary.json into a DataFrame, aggregate over seeds with 95%
confidence intervals, compare adaptive and fixed budgets pairwise (same seq_len and seed), and plot."""

import json
from pathlib import Path

import numpy as np
import pandas as pd

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
    "k_difficulty_spearman_recall",
    "k_difficulty_spearman_counting",
]
TABLE_METRICS = [m for m in METRICS if m not in ("test_loss", "test_acc", "step_ms")]

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


def load_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run (every summary.json below `sweep_dir`), scalar fields only, plus `run_dir`."""
    rows = []
    for path in sorted(Path(sweep_dir).rglob("summary.json")):
        summary = json.loads(path.read_text())
        row = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}
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
    ci = std * n.map(lambda c: t_quantile(c - 1)) / np.sqrt(n)
    return pd.concat({"mean": mean, "ci95": ci, "std": std, "n": n}, axis=1).swaplevel(axis=1).sort_index(axis=1)


def paired_comparison(runs: pd.DataFrame, model: str, baseline: str, metric: str) -> pd.DataFrame:
    """model - baseline on `metric`, paired by (seq_len, seed): mean difference and 95% CI per seq_len."""
    ok = runs[runs["status"] == "ok"]
    a = ok[ok["model"] == model].set_index(["seq_len", "seed"])[metric]
    b = ok[ok["model"] == baseline].set_index(["seq_len", "seed"])[metric]
    diff = (a - b).dropna().groupby(level="seq_len")
    out = pd.DataFrame({"mean_diff": diff.mean(), "n": diff.count(), "std": diff.std(ddof=1)})
    out["ci95"] = out["std"] * out["n"].map(lambda c: t_quantile(c - 1)) / np.sqrt(out["n"])
    out.insert(0, "comparison", f"{model} - {baseline}")
    out.insert(1, "metric", metric)
    return out.reset_index()


def load_k_vs_difficulty(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-sequence k and MQAR difficulty of every run that recorded them (k_vs_difficulty.csv)."""
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / "k_vs_difficulty.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame["model"], frame["seq_len"], frame["seed"] = run["model"], run["seq_len"], run["seed"]
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


def plot_sweep(runs: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Line plots over seq_len per model (val loss, accuracy, tokens/s, peak memory, pairs share), k
    histograms per layer and k vs difficulty. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_metrics_vs_seq_len(aggregate(runs), out_dir / "metrics_vs_seq_len.png")]
    k = load_k_vs_difficulty(runs)
    if not k.empty:
        written.append(plot_k(k, out_dir / "k_histograms_and_difficulty.png"))
    return written


def plot_metrics_vs_seq_len(agg: pd.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt

    panels = [
        m
        for m in ("val_loss", "val_acc", "tokens_per_s", "peak_mem_bytes", "pairs_share")
        if m in agg.columns.get_level_values(0)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        for model, frame in agg.groupby(level="model"):
            x = frame.index.get_level_values("seq_len")
            ax.errorbar(
                x, frame[(metric, "mean")], yerr=frame[(metric, "ci95")].fillna(0), marker="o", capsize=3, label=model
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seq_len")
        ax.set_title(metric + (" (bytes)" if metric == "peak_mem_bytes" else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("mean ± 95% CI over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_k(k: pd.DataFrame, path: Path) -> Path:
    """Histograms of each sequence's k per layer, and mean k against difficulty, per model."""
    import matplotlib.pyplot as plt

    layers = sorted(c for c in k.columns if c.startswith("k_layer"))
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.6 * (len(layers) + 1), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for model, frame in k.groupby("model"):
            values = frame[layer].dropna()  # runs that did not record this layer
            if len(values):
                ax.hist(values, bins=30, alpha=0.6, label=model)
        ax.set_title(f"k per sequence, {layer.removeprefix('k_')}")
    ax = axes[0][-1]
    for (model, task), frame in k.groupby(["model", "task"]):
        means = frame.groupby("difficulty")["k"].mean()
        ax.plot(means.index, means.values, marker=".", label=f"{model} {task}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("difficulty (recall: pairs; counting: alphabet)")
    ax.set_ylabel("mean k")
    ax.set_title("k vs difficulty")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analyse(sweep_dir: str | Path, out_dir: str | Path | None = None, plots: bool = True) -> pd.DataFrame:
    """Write results.csv (per run), summary.md (mean ± CI, paired comparisons) and plots into out_dir."""
    runs = load_runs(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out_dir / "results.csv", index=False)
    lines = [
        f"# Sweep {sweep_dir}",
        "",
        f"{(runs['status'] == 'ok').sum()} ok, {(runs['status'] != 'ok').sum()} failed",
        "",
    ]
    if (runs["status"] == "ok").any():
        lines += ["## mean ± 95% CI over seeds", "", format_table(aggregate(runs)).to_markdown(), ""]
        models = set(runs["model"])
        pairs = [
            (m, b) for m in sorted(models) if m.startswith("adaptive") for b in sorted(models) if b.startswith("fixed")
        ]
        comparisons = [paired_comparison(runs, m, b, metric) for m, b in pairs for metric in ("val_loss", "val_acc")]
        if comparisons:
            lines += [
                "## paired differences (same seq_len and seed)",
                "",
                pd.concat(comparisons).round(4).to_markdown(index=False),
                "",
            ]
        if plots:
            plot_sweep(runs, out_dir)
    failed = runs[runs["status"] != "ok"]
    if len(failed):
        lines += ["## failed runs", "", failed[["run_dir", "error"]].to_markdown(index=False), ""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    return runs
