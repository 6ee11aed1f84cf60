"""The grid tables of this directory's README: what the planned grid (`run.sh`: `counting/` and `text/`) cost,
its paired differences against the superseded jobs of the same (data, length, seed), which ran over many
commits (`results/exp3_cpu_multicommit`), and what one dense warm-up per (data, length, seed) saves
(`run_warm_start.sh`): counted from each job's val_curve, and measured on the groups in
`results/exp3_cpu_warm_start`.
    python results/exp3_cpu/compare.py"""

import json
from pathlib import Path

import pandas as pd

from adaptive_attn.analysis.findings import mean_ci, paired
from adaptive_attn.analysis.results import load_runs

HERE = Path(__file__).parent
SUPERSEDED = HERE.parent / "exp3_cpu_multicommit"
WARM_STARTED = HERE.parent / "exp3_cpu_warm_start"
SAME = ["val_loss", "val_acc", "test_loss", "test_acc", "val_acc_auc"]  # warm-started in token mode: bit for bit
PLANNED = {
    ("counting", 64): 40,
    ("counting", 128): 18,
    ("text_domains", 512): 33,
    ("text_domains", 1024): 33,
    ("text_domains", 2048): 33,
}  # run.sh's 157 jobs
# jobs that shared the two cores with other processes (short benchmarks, 2026-12-04 07:00-08:02 UTC): their
# results are as any run's, their wall time is not the grid's own, so the cost factor is also given without them
SHARED_CORES = (
    {("counting", f"{m}_L64_s0") for m in "dense fixed10 fixed25".split()}
    | {("text_domains", f"{m}_L2048_s1") for m in "adaptive_topp oracle shuffled".split()}
    | {("text_domains", f"{m}_L2048_s2") for m in "adaptive10 adaptive dense fixed10 fixed25 fixed50 fixed75".split()}
    | {("text_domains", "shuffled10_L2048_s2")}
)
PAIRS = [
    ("adaptive10", "fixed10"),
    ("adaptive", "fixed25"),
    ("adaptive_topp", "fixed25"),
    ("adaptive10", "shuffled10"),
    ("adaptive", "shuffled"),
    ("oracle", "fixed25"),
    ("oracle10", "fixed10"),
    ("fixed10", "dense"),
    ("fixed25", "dense"),
    ("fixed50", "dense"),
    ("fixed75", "dense"),
]


def ok_runs(root: Path) -> pd.DataFrame:
    runs = load_runs(root)
    runs = runs[runs["status"] == "ok"].copy()
    runs["job"] = runs["run_dir"].map(lambda d: Path(d).name)
    return runs


def cost_row(label: str, jobs: str, runs: pd.DataFrame, committed) -> str:
    here, before = runs["wall_s"].sum(), committed(runs)
    shared = [(data, job) in SHARED_CORES for data, job in zip(runs["data"], runs["job"])]
    clean = runs[~pd.Series(shared, index=runs.index, dtype=bool)]
    ratios = [f"{h / c:.2f}" if c else "–" for h, c in ((here, before), (clean["wall_s"].sum(), committed(clean)))]
    return f"| {label} | {jobs} | {here / 3600:.2f} | {before / 3600:.2f} | {ratios[0]} | {ratios[1]} ({len(clean)}) |"


def cost_table(grid: pd.DataFrame, superseded: pd.DataFrame) -> str:
    before_wall = superseded.set_index(["data", "job"])["wall_s"]

    def committed(runs: pd.DataFrame) -> float:
        return before_wall.loc[list(zip(runs["data"], runs["job"]))].sum()

    lines = [
        "| data | L | jobs finished | job-hours here | the same jobs committed | here / committed "
        "| the same, jobs on cores of their own (how many) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (data, length), planned in PLANNED.items():
        cell = grid[(grid["data"] == data) & (grid["seq_len"] == length)]
        lines.append(cost_row(f"{data} | {length}", f"{len(cell)} of {planned}", cell, committed))
    return "\n".join(lines + [cost_row("all |", f"{len(grid)} of 157", grid, committed)])


def pairs_table(grid: pd.DataFrame, superseded: pd.DataFrame) -> str:
    lines = [
        "| data | L | comparison | metric | here (one commit) | committed, same seeds | committed, all seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for (data, length), cell in grid.groupby(["data", "seq_len"]):
        metric = "val_loss" if data == "text_domains" else "val_acc"
        committed = superseded[(superseded["data"] == data) & (superseded["seq_len"] == length)]
        for model, baseline in PAIRS:
            here, before = (paired(runs, model, baseline, metric, "diff") for runs in (cell, committed))
            if here.empty:
                continue
            same_seeds = before[before.index.isin(here.index)]
            lines.append(
                f"| {data} | {length} | {model} - {baseline} | {metric} | {mean_ci(here)} | "
                f"{mean_ci(same_seeds)} | {mean_ci(before)} |"
            )
    return "\n".join(lines)


def read_summary(run_dir: str) -> dict:
    """A run's whole summary.json (`load_runs` keeps its scalar fields only, without val_curve or
    warm_started_from)."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def warmup_seconds(run_dir: str) -> float:
    """A sparse run's training seconds to the end of its dense warm-up (its val_curve has a point there); 0 for
    a run without a warm-up."""
    summary = read_summary(run_dir)
    steps = summary["config"]["module"]["dense_warmup_steps"]
    at_end = [p["wall_s"] for p in summary["val_curve"] if p["step"] == steps]
    return at_end[0] if steps and summary["model"] != "dense" else 0.0


def warm_start_check(grid: pd.DataFrame, warm: pd.DataFrame) -> str:
    """The jobs re-run by `run_warm_start.sh` against the grid's: wall time, the warm-up they skipped, whether
    each result is the same bits; then each re-run group's time against the grid's, measured and counted."""
    keyed = grid.set_index(["data", "job"])
    lines = [
        "| data | job | wall s (run.sh) | wall s (warm start) | saved s | warm-up s (run.sh) | same results |",
        "|---|---|---|---|---|---|---|",
    ]
    warm = warm.assign(started=[read_summary(d).get("warm_started_from") is not None for d in warm["run_dir"]])
    for _, run in warm.sort_values(["data", "seq_len", "seed", "job"]).iterrows():
        before = keyed.loc[(run["data"], run["job"])]
        same = all(run[m] == before[m] for m in SAME)
        lines.append(
            f"| {run['data']} | {run['job']}{' (warm start)' if run['started'] else ''} | {before['wall_s']:.0f} | "
            f"{run['wall_s']:.0f} | {before['wall_s'] - run['wall_s']:.0f} | {before['warmup_s']:.0f} | "
            f"{'yes' if same else 'no'} |"
        )
    lines += [
        "",
        "| group | warm start / run.sh, measured | counted | jobs run as in run.sh, measured |",
        "|---|---|---|---|",
    ]
    for (data, length, seed), runs in warm.groupby(["data", "seq_len", "seed"]):
        before = keyed.loc[[(data, job) for job in runs["job"]]]
        controls = runs[~runs["started"]]
        lines.append(
            f"| {data} L={length} seed {seed} | {runs['wall_s'].sum() / before['wall_s'].sum():.3f} | "
            f"{before['warm_cost'].sum() / before['wall_s'].sum():.3f} | "
            f"{controls['wall_s'].sum() / keyed.loc[[(data, j) for j in controls['job']], 'wall_s'].sum():.3f} |"
        )
    return "\n".join(lines)


def warm_start_cost(grid: pd.DataFrame) -> str:
    """The grid's cost with one dense warm-up per (data, length, seed), as `run_warm_start.sh` runs it (column
    `warm_cost`), and when its two lanes, taking the groups costliest first, would end."""
    lines = [
        "| data | L | job-hours (run.sh) | warm-ups skipped | job-hours, one warm-up per length and seed |",
        "|---|---|---|---|---|",
    ]
    for (data, length), cell in grid.groupby(["data", "seq_len"]):
        run_sh, warm = cell["wall_s"].sum() / 3600, cell["warm_cost"].sum() / 3600
        lines.append(f"| {data} | {length} | {run_sh:.2f} | {run_sh - warm:.2f} | {warm:.2f} |")
    total = grid["warm_cost"].sum() / 3600
    lines.append(f"| all | | {grid['wall_s'].sum() / 3600:.2f} | | **{total:.2f}** ({total / 2:.1f} h two lanes) |")
    lanes = [0.0, 0.0]
    for cost in grid.groupby(["data", "seq_len", "seed"])["warm_cost"].sum().sort_values(ascending=False):
        lanes[lanes.index(min(lanes))] += cost / 3600
    return (
        "\n".join(lines)
        + f"\n\nTwo lanes taking the groups costliest first end after {max(lanes):.2f} and {min(lanes):.2f} hours."
    )


if __name__ == "__main__":
    grid = pd.concat([ok_runs(HERE / "text"), ok_runs(HERE / "counting")], ignore_index=True)
    superseded = ok_runs(SUPERSEDED)
    print(cost_table(grid, superseded), pairs_table(grid, superseded), sep="\n\n")
    grid["warmup_s"] = grid["run_dir"].map(warmup_seconds)
    # every sparse arm but fixed10 skips its training seconds to the warm-up's end (a lower bound on what it
    # skips: the validations within the warm-up are not counted)
    grid["warm_cost"] = grid["wall_s"] - grid["warmup_s"].where(grid["model"] != "fixed10", 0.0)
    print("", warm_start_cost(grid), sep="\n")
    if WARM_STARTED.is_dir():
        print("", warm_start_check(grid, ok_runs(WARM_STARTED)), sep="\n")
