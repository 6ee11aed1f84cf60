"""Sweeps, the GPU-pool launcher, fault tolerance, resume, W&B and the analysis notebook (all on CPU)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from adaptive_attn.analysis import aggregate, analyse, load_runs, paired_comparison
from adaptive_attn.analysis.plots import model_color
from adaptive_attn.analysis.results import compute_spent, coverage
from adaptive_attn.config import group_options
from adaptive_attn.runner import run

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["experiment=quick", "callbacks=minimal", "logger=none"]


def multirun(
    sweep_dir: Path, *overrides: str, env: dict | None = None, returncode: int = 0
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_attn.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def gpu_pool_sweep(tmp_path_factory) -> Path:
    """2 models x 2 seq_len x 2 seeds through the GPU-pool launcher with a faked count of 2 GPUs."""
    sweep = tmp_path_factory.mktemp("sweep")
    multirun(
        sweep,
        *QUICK,
        "data=mqar",
        "model=adaptive,fixed25",
        "seq_len=32,64",
        "seed=0,1",
        "module.dense_warmup_steps=2",
        "trainer.max_steps=30",  # runs long enough that the two workers' jobs overlap in time
        "hydra/launcher=gpu_pool",
        "hydra.launcher.n_gpus=2",
    )
    return sweep


def test_gpu_pool_runs_jobs_in_parallel_never_sharing_a_gpu(gpu_pool_sweep):
    runs = [json.loads(p.read_text()) for p in gpu_pool_sweep.rglob("summary.json")]
    assert len(runs) == 8 and all(r["status"] == "ok" for r in runs)
    assert {r["cuda_visible_devices"] for r in runs} == {"0", "1"}
    assert len({r["pid"] for r in runs}) == 8  # a fresh process per job
    overlapping = [
        (a, b)
        for a, b in itertools.combinations(runs, 2)
        if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
    ]
    assert overlapping, "no two jobs ran at the same time"
    assert all(a["cuda_visible_devices"] != b["cuda_visible_devices"] for a, b in overlapping)
    # k against MQAR difficulty: a correlation for the adaptive budget, undefined for a fixed one
    assert all(("k_difficulty_spearman_recall" in r) == (r["model"] == "adaptive") for r in runs)


def test_sweep_end_writes_analysis_and_notebook_runs_on_it(gpu_pool_sweep):
    assert (gpu_pool_sweep / "summary.md").exists() and (gpu_pool_sweep / "results.csv").exists()
    runs = load_runs(gpu_pool_sweep)
    agg = aggregate(runs)
    assert agg[("val_loss", "n")].eq(2).all() and len(agg) == 4
    diff = paired_comparison(runs, "adaptive", "fixed25", "val_loss")
    assert list(diff["n"]) == [2, 2]
    analyse(gpu_pool_sweep, gpu_pool_sweep / "analysis")
    assert (gpu_pool_sweep / "analysis" / "metrics_vs_seq_len.png").stat().st_size > 0

    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["SWEEP_DIR"] = str(gpu_pool_sweep)
    try:
        NotebookClient(
            nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
        ).execute()
    finally:
        del os.environ["SWEEP_DIR"]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert (gpu_pool_sweep / "plots" / "metrics_vs_seq_len.png").exists()


def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # top_k=9 > 4 routed experts: that job fails, the other finishes, and the sweep exits non-zero
    multirun(tmp_path, *QUICK, "model=dense", "model.moe.top_k=2,9", returncode=1)
    runs = load_runs(tmp_path).sort_values("run_dir")
    assert list(runs["status"]) == ["ok", "failed"]
    assert "model.moe.top_k=9" in runs["error"].iloc[1]
    # summary.md says what ran: one seed finished, one job did not
    assert coverage(runs).iloc[0][runs["seq_len"].iloc[0]] == f"{runs['seed'].iloc[0]} (1 not ok)"
    unfinished = (tmp_path / "summary.md").read_text().split("## runs that did not finish")[1]
    assert "| status   |   steps | error" in unfinished and "| failed   |" in unfinished and "top_k=9" in unfinished


def test_coverage_lists_the_finished_seeds_of_each_model_and_length():
    runs = pd.DataFrame(
        {
            "data": ["counting"] * 5 + ["text"],
            "model": ["dense", "dense", "dense", "fixed10", "fixed10", "dense"],
            "seq_len": [64, 64, 128, 64, 64, 512],
            "seed": [1, 0, 0, 2, 0, 0],
            "status": ["ok", "ok", "ok", "ok", "interrupted", "ok"],
        }
    )
    table = coverage(runs).set_index(["data", "model"])
    assert table.loc[("counting", "dense"), 64] == "0,1"
    assert table.loc[("counting", "dense"), 128] == "0"
    assert table.loc[("counting", "fixed10"), 64] == "2 (1 not ok)"
    assert table.loc[("counting", "fixed10"), 128] == ""  # never ran
    assert table.loc[("text", "dense"), 512] == "0" and table.loc[("counting", "dense"), 512] == ""


def test_compute_spent_sums_the_job_hours_of_every_run_by_model_length_and_data_set():
    runs = pd.DataFrame(
        {
            "data": ["counting"] * 4 + ["text"],
            "model": ["dense", "dense", "fixed10", "fixed10", "dense"],
            "seq_len": [64, 64, 64, 128, 512],
            "wall_s": [1800.0, 3600.0, 7200.0, None, 900.0],  # the run killed outright recorded no time
            "status": ["ok", "ok", "interrupted", "failed", "ok"],
        }
    )
    table = compute_spent(runs).set_index(["data", "model"])
    assert table.loc[("counting", "dense"), 64] == 1.5 and table.loc[("counting", "fixed10"), 64] == 2.0
    assert table.loc[("counting", "dense"), 512] == ""  # never ran
    assert table.loc[("counting", "all"), "all"] == 3.5 and table.loc[("text", "all"), 512] == 0.25
    assert table.loc[("all", "all"), "all"] == 3.75 and table.loc[("all", "all"), 64] == 3.5


def test_every_model_config_has_a_colour_of_its_own():
    models = group_options("model")
    assert len({model_color(m) for m in models}) == len(models)


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(
    "model",  # block mode: adaptive budgets draw query blocks (`draw_rows`), whose stream the checkpoint carries
    [["model=fixed25"], ["model=adaptive", "model.sparse.block_size=4", "model.sparse.query_block=8"]],
)
def test_resume_from_last_checkpoint_matches_uninterrupted_run(compose_cfg, tmp_path, model):
    common = [
        "experiment=quick",
        *model,
        "module.dense_warmup_steps=3",
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    full = run(compose_cfg(common, run_dir="uninterrupted"))

    crash = ["+callbacks.crash._target_=tests.test_workflow.CrashAt", "+callbacks.crash.step=5"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg([*common, *crash]))
    resumed = run(compose_cfg([*common, "ckpt_path=last"]))
    assert resumed["steps"] == full["steps"] == 8
    assert resumed["val_loss"] == full["val_loss"]


def test_a_run_shorter_than_its_validation_interval_still_reports_val_loss(compose_cfg):
    cfg = compose_cfg(["experiment=quick", "model=dense", "trainer.max_steps=3", "trainer.val_check_interval=50"])
    summary = run(cfg)
    assert summary["status"] == "ok" and summary["val_loss"] is not None and summary["steps"] == 3


def test_wandb_runs_offline_one_per_job(tmp_path):
    multirun(
        tmp_path,
        "experiment=quick",
        "callbacks=minimal",
        "logger=wandb",
        "model=dense",
        "seed=0,1",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    job_dirs = sorted(p.parent for p in tmp_path.rglob("summary.json"))
    assert len(job_dirs) == 2
    for job_dir in job_dirs:
        runs = list((job_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, job_dir
        assert (job_dir / "csv" / "metrics.csv").exists()
        meta = json.loads(json.dumps(json.loads((job_dir / "summary.json").read_text())["config"]["logger"]))
        assert meta["wandb"]["group"] == "dense-L64" and meta["wandb"]["offline"] is True


def test_ddp_run_on_two_cpu_processes_writes_one_summary(tmp_path):
    """trainer=ddp, with gloo on the CPU: the adaptive model (whose controller gets no gradient in the dense
    warm-up) trains in two processes, and only the first writes the summary and prints."""
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_attn.train", *QUICK, "trainer=ddp", "trainer.accelerator=cpu"]
        + ["trainer.devices=2", "trainer.precision=32-true", "model=adaptive", "module.dense_warmup_steps=2"]
        + [f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done:") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 6 and summary["val_loss"] is not None
