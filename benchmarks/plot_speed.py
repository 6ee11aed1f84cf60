"""Figure of the model-level speed tables: each model's training step split into its components (the
profiled breakdown of `throughput.py --breakdown`), one panel per table, each sparse model's bar labelled
with its timed step ratio to dense, the 95% interval and Amdahl's bound.

    python benchmarks/plot_speed.py results/cpu_epyc_avx2/threads2_taps/throughput_cpu_research_L*.json \
        --out results/cpu_epyc_avx2/threads2_taps/speed_breakdown.png
"""

import argparse
import json
from pathlib import Path

from adaptive_attn.analysis.plots import save

# a step's parts (`adaptive_attn.nn.component`, and the rest), in the order the bars stack them: attention,
# the sparse-only work, then what every model runs
COLOURS = {
    "dense_attention": "tab:blue",
    "sparse_attention": "tab:green",
    "indexer": "tab:orange",
    "budget": "tab:red",
    "selection": "tab:purple",
    "indexer_kl": "gold",
    "moe": "tab:gray",
    "optimizer": "silver",
    "rest": "whitesmoke",
}


def panel(path: Path) -> dict:
    """A `throughput.py --breakdown` JSON -> its title and, per model, the ms of each part and its label."""
    records = json.loads(path.read_text())
    if any("breakdown_ms" not in r for r in records):
        raise SystemExit(f"{path}: no breakdown in it (throughput.py --breakdown writes one)")
    first = records[0]
    threads = f"{first['threads']} thread" + ("s" if first["threads"] > 1 else "")
    # the block sizes as they reached the models (the overrides each took), not as they were asked for
    sparse = sorted({o.removeprefix("model.sparse.") for r in records for o in r["overrides"] if "model.sparse." in o})
    title = ", ".join([f"{path.stem.removeprefix('throughput_')}: batch {first['batch']}", threads, *sparse])
    bars = []
    for r in records:
        label = f"{r['ratio_vs_baseline']:.2f}x {first['model']}"
        if r is not first:
            low, high = r["ratio_interval"]
            label += f" [{low:.2f}, {high:.2f}]"
            label += f", bound {r['amdahl_bound']:.2f}" if "amdahl_bound" in r else ""
            label += f"; {r['vs_fixed']['ratio']:.2f}x {r['vs_fixed']['model']}" if "vs_fixed" in r else ""
        bars.append({"model": r["model"], "ms": {part: r["breakdown_ms"][part] for part in COLOURS}, "label": label})
    return {"title": title, "bars": bars}


def plot(panels: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_bars = sum(len(p["bars"]) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.0 + 0.35 * n_bars + 0.45 * len(panels)), squeeze=False)
    for ax, p in zip(axes[:, 0], panels):
        bars = p["bars"][::-1]  # the baseline on top
        left = [0.0] * len(bars)
        for part, colour in COLOURS.items():
            widths = [b["ms"][part] for b in bars]
            ax.barh([b["model"] for b in bars], widths, left=left, color=colour, edgecolor="black", linewidth=0.3)
            left = [a + w for a, w in zip(left, widths)]
        for y, (total, b) in enumerate(zip(left, bars)):
            ax.text(total, y, "  " + b["label"], va="center", fontsize=8)
        ax.set_xlim(0, max(left) * 1.6)  # room for the labels
        ax.set_title(p["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=8)
    fig.axes[-1].set_xlabel("ms per training step (profiled; the ratios are the timed steps')")
    patches = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black", linewidth=0.3) for c in COLOURS.values()]
    legend = dict(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(COLOURS), fontsize=7, frameon=False)
    axes[-1, 0].legend(patches, COLOURS, **legend)  # under the last panel's axis label
    return save(fig, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", nargs="+", type=Path, help="throughput.py --breakdown JSON files, one panel each")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    args = p.parse_args()
    print(plot([panel(path) for path in args.tables], args.out))


if __name__ == "__main__":
    main()
