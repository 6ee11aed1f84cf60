"""The grid tables of this directory's README: what the planned grid (`run.sh`: `counting/` and `text/`) cost,
and its paired differences against the superseded jobs of the same (data, length, seed), which ran over many
commits (`results/exp3_cpu_multicommit`).
    python results/exp3_cpu/compare.py"""

from pathlib import Path

import pandas as pd

from adaptive_attn.analysis.findings import mean_ci, paired
from adaptive_attn.analysis.results import load_runs

HERE = Path(__file__).parent
SUPERSEDED = HERE.parent / "exp3_cpu_multicommit"
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


if __name__ == "__main__":
    grid = pd.concat([ok_runs(HERE / "text"), ok_runs(HERE / "counting")], ignore_index=True)
    superseded = ok_runs(SUPERSEDED)
    print(cost_table(grid, superseded), pairs_table(grid, superseded), sep="\n\n")
