"""Plots of a sweep: metrics against length, convergence curves, quality against compute, k."""

from pathlib import Path

import pandas as pd

from adaptive_attn.analysis.results import aggregate, load_curves, load_k_vs_difficulty
from adaptive_attn.data.atomic import write_atomically


def save(fig, path: Path, title: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


# one colour per model config: a name and its colour side by side, so a new config cannot run past the palette
MODEL_COLOURS = {
    "dense": "tab:blue",
    "fixed10": "tab:orange",
    "fixed25": "tab:green",
    "fixed50": "tab:red",
    "fixed75": "tab:purple",
    "adaptive10": "tab:brown",
    "adaptive": "tab:pink",
    "adaptive_topp": "tab:olive",
    "oracle10": "tab:cyan",
    "oracle": "tab:gray",
    "shuffled10": "black",
    "shuffled": "gold",
    "adaptive10_lr30": "darkgreen",
    "shuffled10_lr30": "navy",
    "fixed_k": "maroon",
}


def model_color(model: str) -> str:
    """One colour per model name, the same in every panel and plot (a name not listed: one of the listed
    colours, picked by the name)."""
    if model in MODEL_COLOURS:
        return MODEL_COLOURS[model]
    colours = list(MODEL_COLOURS.values())
    return colours[sum(map(ord, model)) % len(colours)]


def plot_sweep(runs: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Line plots over seq_len per model (val loss, accuracy, tokens/s, peak memory, pairs share), k
    histograms per layer and k vs difficulty. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_metrics_vs_seq_len(aggregate(runs), out_dir / "metrics_vs_seq_len.png")]
    curves = load_curves(runs)
    if not curves.empty:
        written.append(plot_convergence(curves, out_dir / "convergence.png"))
    ok = runs[runs["status"] == "ok"]
    if "pairs_share" in ok and ok["pairs_share"].notna().any():
        written.append(plot_pareto(runs, out_dir / "quality_vs_compute.png"))
    k = load_k_vs_difficulty(runs)
    if not k.empty:
        written.append(plot_k(k, out_dir / "k_histograms_and_difficulty.png"))
    return written


def plot_convergence(curves: pd.DataFrame, path: Path) -> Path:
    """Validation accuracy (loss where there is no accuracy) against steps and against training seconds,
    one panel per length, mean over seeds with a min-max band."""
    import matplotlib.pyplot as plt

    metric = "acc" if curves["acc"].notna().any() and curves["acc"].max() > 0 else "loss"
    lengths = sorted(curves["seq_len"].unique())
    fig, axes = plt.subplots(2, len(lengths), figsize=(4.2 * len(lengths), 6.4), squeeze=False)
    for col, seq_len in enumerate(lengths):
        for model, frame in curves[curves["seq_len"] == seq_len].groupby("model"):
            by_step = frame.groupby("step")
            for row, x in enumerate((by_step["step"].first(), by_step["wall_s"].mean())):
                ax = axes[row][col]
                color = model_color(model)
                ax.plot(x.values, by_step[metric].mean().values, label=model, color=color)
                lo, hi = by_step[metric].min().values, by_step[metric].max().values
                ax.fill_between(x.values, lo, hi, alpha=0.2, color=color)
        axes[0][col].set_title(f"L = {seq_len}")
        axes[0][col].set_xlabel("step")
        axes[1][col].set_xlabel("training seconds")
        for row in range(2):
            axes[row][col].set_ylabel(f"val {metric}")
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save(fig, path, "convergence: mean over seeds, band = min..max")


def plot_pareto(runs: pd.DataFrame, path: Path) -> Path:
    """Quality against compute (the share of causal query-key pairs attended), per length: each model a
    point (mean ± 95% CI over seeds); the fixed budgets joined, a frontier that adapting should beat."""
    import matplotlib.pyplot as plt

    agg = aggregate(runs, metrics=["pairs_share", "val_acc", "val_loss"])
    text = "data" in runs and (runs["data"] == "text_domains").all()  # judged by loss, as in the findings
    has_acc = ("val_acc", "mean") in agg and agg[("val_acc", "mean")].max() > 0
    quality = "val_acc" if has_acc and not text else "val_loss"
    lengths = sorted(agg.index.get_level_values("seq_len").unique())
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        frame = agg.xs(seq_len, level="seq_len")
        x = frame[("pairs_share", "mean")].fillna(1.0)  # dense attends every pair
        y, err = frame[(quality, "mean")], frame[(quality, "ci95")].fillna(0)
        for model in frame.index:
            ax.errorbar(
                x[model], y[model], yerr=err[model], marker="o", capsize=3, label=model, color=model_color(model)
            )
        fixed = sorted((x[m], y[m]) for m in frame.index if m.startswith("fixed") or m == "dense")
        if len(fixed) > 1:
            ax.plot(*zip(*fixed), color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"L = {seq_len}")
        ax.set_xlabel("share of causal pairs attended")
        ax.set_ylabel(quality)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save(fig, path)


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
            mean, err = frame[(metric, "mean")], frame[(metric, "ci95")].fillna(0)
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=model, color=model_color(model))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("seq_len")
        ax.set_title(metric + (" (bytes)" if metric == "peak_mem_bytes" else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return save(fig, path, "mean ± 95% CI over seeds")


def plot_k(k: pd.DataFrame, path: Path) -> Path:
    """Histograms of each sequence's k per layer, and mean k against difficulty (synthetic tasks) or text
    domain, per model."""
    import matplotlib.pyplot as plt

    layers = sorted(c for c in k.columns if c.startswith("k_layer"))
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.6 * (len(layers) + 1), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for model, frame in k.groupby("model"):
            values = frame[layer].dropna()  # runs that did not record this layer
            if len(values):
                ax.hist(values, bins=30, alpha=0.6, label=model, color=model_color(model))
        ax.set_title(f"k per sequence, {layer.removeprefix('k_')}")
    ax = axes[0][-1]
    by = "difficulty" if "difficulty" in k else "domain"
    lengths = sorted(k["seq_len"].unique())
    for (model, task, seq_len), frame in k.groupby(["model", "task", "seq_len"]):
        means = frame.groupby(by)["k"].mean()
        style = dict(color=model_color(model), linestyle=["-", "--", ":", "-."][lengths.index(seq_len) % 4])
        ax.plot(means.index, means.values, marker=".", label=f"{model} {task} L={seq_len}", **style)
    if by == "difficulty":
        ax.set_xscale("log", base=2)
    ax.set_xlabel("difficulty (pairs, or alphabet size)" if by == "difficulty" else "text domain")
    ax.set_ylabel("mean k")
    ax.set_title(f"k vs {by}")
    ax.legend(fontsize=6)
    return save(fig, path)
