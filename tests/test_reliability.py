"""Runs that survive what users and clusters do to them: signals, resumes, bad input files, odd options."""

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from adaptive_attn.analysis import load_runs
from adaptive_attn.data import text
from adaptive_attn.data.datamodule import TextDataModule
from adaptive_attn.runner import run

ROOT = Path(__file__).resolve().parent.parent
LONGER = ["experiment=quick", "trainer.max_steps=40", "trainer.val_check_interval=20", "seed=3"]


class AnnounceSteps(L.Callback):
    """Prints each finished training step, so a test knows when to send its signal."""

    def on_train_batch_end(self, trainer, *args):
        print(f"step {trainer.global_step}", flush=True)


def train_cli(*args: str, stop_at: int | None = None, signum=signal.SIGTERM) -> subprocess.CompletedProcess:
    """Run the training CLI; with `stop_at`, send `signum` once it has finished that many steps."""
    command = [sys.executable, "-m", "adaptive_attn.train", *args]
    if stop_at is None:
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    announce = ["+callbacks.announce._target_=tests.test_reliability.AnnounceSteps"]
    proc = subprocess.Popen(command + announce, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.strip() == f"step {stop_at}":
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def metric_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run directory of LONGER, run without a stop: what every interrupted and resumed run must end as."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    full = train_cli(*LONGER, f"hydra.run.dir={run_dir}")
    assert full.returncode == 0, full.stderr[-2000:]
    return run_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, signum, uninterrupted):
    stopped = train_cli(*LONGER, f"hydra.run.dir={tmp_path / 'run'}", stop_at=13, signum=signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] in (13, 14)  # the step the signal arrived in
    assert summary["resume_with"] == "ckpt_path=last" and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    resumed = train_cli(*LONGER, f"hydra.run.dir={tmp_path / 'run'}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done, reference = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "run", uninterrupted))
    assert done["status"] == "ok" and done["steps"] == 40 and done["val_loss"] == reference["val_loss"]
    assert metric_steps(tmp_path / "run") == metric_steps(uninterrupted)  # the history before the stop too


def test_a_run_killed_outright_resumes_from_its_last_checkpoint_and_logs_each_step_once(tmp_path):
    """SIGKILL leaves no summary and rows logged after the last checkpoint (step 20 of 25 here); the resumed
    run logs those steps again, so they are dropped first."""
    args = [*LONGER, "callbacks=default", "callbacks.model_checkpoint.every_n_train_steps=10"]
    killed = train_cli(*args, f"hydra.run.dir={tmp_path}", stop_at=25, signum=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "summary.json").exists()
    assert max(metric_steps(tmp_path)) > 20  # logged past the checkpoint
    resumed = train_cli(*args, f"hydra.run.dir={tmp_path}", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(tmp_path / "csv" / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert sorted(steps) == list(range(40))  # each step once, those before the kill too
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from"] == [
        dict.fromkeys(("status", "steps", "code_version", "wall_s"))
    ]


def test_ckpt_path_auto_finishes_an_interrupted_sweep_from_its_checkpoints_and_then_skips_it(tmp_path):
    sweep = ["-m", *LONGER, "eval_untrained=true", "seq_len=64,32", f"hydra.sweep.dir={tmp_path}"]
    stopped = train_cli(*sweep, stop_at=13)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    (first,) = [p.parent for p in tmp_path.glob("*/summary.json")]  # the signal stopped the sweep in its first job
    interrupted = json.loads((first / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and "untrained_val_loss" in interrupted
    resumed = train_cli(*sweep, "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    runs = {p.parent: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert sorted(r["seq_len"] for r in runs.values()) == [32, 64]
    assert all(r["status"] == "ok" and r["steps"] == 40 for r in runs.values())
    done = runs[first]
    assert done["resumed_from"] == [{k: interrupted[k] for k in ("status", "steps", "code_version", "wall_s")}]
    assert done["wall_s"] > interrupted["wall_s"] and done["started_at"] == interrupted["started_at"]
    assert done["untrained_val_loss"] == interrupted["untrained_val_loss"]
    assert metric_steps(first) == list(range(40))  # the steps before the signal and after it, once each
    (fresh,) = [r for d, r in runs.items() if d != first]
    assert "resumed_from" not in fresh  # no checkpoint there: a fresh run
    again = train_cli(*sweep, "ckpt_path=auto")
    assert again.returncode == 0 and again.stderr.count("already finished") == 2, again.stderr[-2000:]
    assert {p.parent: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")} == runs


def test_a_resume_with_another_config_is_refused_and_leaves_the_finished_run_as_it_was(tmp_path):
    first = train_cli("experiment=quick", f"hydra.run.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    other = train_cli("experiment=quick", "model=dense", "seq_len=32", "ckpt_path=last", f"hydra.run.dir={tmp_path}")
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert other.returncode != 0 and len(lines) == 1, other.stderr
    assert "this config differs from the run in" in lines[0] and "seq_len: 64 -> 32" in lines[0]
    assert "model._target_: " in lines[0] and "model.sparse.* (" in lines[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_logger_none_runs_with_the_default_callbacks(compose_cfg):
    summary = run(compose_cfg(["experiment=quick", "logger=none", "callbacks=default", "trainer.max_steps=3"]))
    assert summary["status"] == "ok" and summary["tokens_per_s"] > 0  # speed even for a run of 3 steps


def test_quick_experiment_reaches_the_sparse_stage(compose_cfg):
    summary = run(compose_cfg(["experiment=quick", "model=fixed25", "callbacks=minimal", "logger=none"]))
    assert summary["equivalent_keep"] == 0.25 and summary["pairs_share"] < 1


def test_a_sweep_with_a_failing_job_finishes_the_others_and_exits_non_zero(tmp_path):
    sweep = [
        "-m",
        "experiment=quick",
        "logger=none",
        "callbacks=minimal",
        "seq_len=32,1",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = train_cli(*sweep)
    assert proc.returncode == 1 and "1 of 2 jobs did not finish" in proc.stderr
    runs = {json.loads(p.read_text())["seq_len"]: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    assert runs[32]["status"] == "ok" and runs[1]["status"] == "failed" and "seq_len=1 is invalid" in runs[1]["error"]
    rerun = train_cli(*sweep)  # the same command again: the finished job is skipped, the failed one tried again
    assert rerun.returncode == 1 and "already finished" in rerun.stderr
    again = {json.loads(p.read_text())["seq_len"]: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    assert again[32]["ended_at"] == runs[32]["ended_at"] and again[1]["ended_at"] > runs[1]["ended_at"]


def test_the_done_line_leaves_out_an_untrained_loss_that_was_not_measured(tmp_path):
    proc = train_cli("experiment=quick", "logger=none", "callbacks=minimal", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0 and "done: val_loss=" in proc.stdout and "nan" not in proc.stdout


def test_a_corrupted_summary_is_skipped_with_a_warning_naming_it(tmp_path):
    for name, body in (("good", {"status": "ok", "model": "dense", "seq_len": 64, "seed": 0}), ("bad", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(body) if body else '{"status": "ok", "val')
    with pytest.warns(UserWarning, match=r"skipping .*bad/summary.json"):
        runs = load_runs(tmp_path)
    assert list(runs["model"]) == ["dense"]


def test_text_corpora_read_text_files_only_and_always_hold_out_validation(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    (corpus / "__pycache__").mkdir(parents=True)
    (corpus / "a.py").write_text("def a():\n    return 1\n" * 200)
    (corpus / "b.py").write_text("def b():\n    return 2\n" * 200)
    (corpus / "koi8.py").write_bytes("# кодировка\n".encode("koi8_r") * 100)
    (corpus / "__pycache__" / "a.cpython-311.pyc").write_bytes(bytes(range(256)) * 10)
    dm = TextDataModule(seq_len=32, paths=[str(corpus)], cache_dir=str(tmp_path / "cache"), batch_size=2)
    assert "skipped 2 of 4 files that are not UTF-8 text" in capsys.readouterr().err
    assert [f.name for f in dm.files] == ["a.py", "b.py"]
    dm.setup()
    assert len(dm.splits["val"]) > 0 and len(dm.splits["train"]) > 0
    # a single file is split by tokens, whichever side its path's hash would pick
    hashed_to_val = next(p for i in range(10_000) if text.split_of(p := corpus / f"v{i}.py", 2.0) == "val")
    hashed_to_val.write_text("def v():\n    return 3\n" * 200)
    for path in (corpus / "a.py", hashed_to_val):
        single = TextDataModule(seq_len=32, paths=[str(path)], cache_dir=str(tmp_path / "cache"))
        single.setup()
        assert len(single.splits["val"]) > 0 and len(single.splits["train"]) > 0
    assert all(text.is_text(f) for f in dm.files) and not text.is_text(corpus / "koi8.py")
