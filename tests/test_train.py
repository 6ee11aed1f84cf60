import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from adaptive_attn.process import cpu_model
from adaptive_attn.runner import run
from adaptive_attn.summary import code_version


def test_quick_text_run_writes_a_complete_summary(compose_cfg):
    cfg = compose_cfg(["experiment=quick", "model=fixed25"])
    summary = run(cfg)
    on_disk = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert on_disk["status"] == "ok" and summary["status"] == "ok"
    for key in ("model", "seq_len", "seed", "val_loss", "tokens_per_s", "peak_mem_bytes", "wall_s", "config", "keep"):
        assert on_disk[key] is not None, key
    assert on_disk["model"] == "fixed25" and on_disk["seq_len"] == 64 and on_disk["steps"] == 6
    # the device its times were measured on, by name: a CPU's model and torch's vector capability
    cpu = f"({cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    assert on_disk["device"] == f"cpu {cpu}"
    assert 0 < on_disk["pairs_share"] < 1 and abs(on_disk["equivalent_keep"] - 0.25) < 0.02
    assert 0 <= on_disk["attn_mass_recall_random"] < on_disk["attn_mass_recall"] <= 1
    assert (Path(cfg.output_dir) / "checkpoints" / "last.ckpt").exists()
    if shutil.which("git") and (Path(__file__).parent.parent / ".git").exists():  # a git checkout: its commit
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        assert on_disk["code_version"].removesuffix("-dirty") == head.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_is_dirty_for_changed_code_and_not_for_results_written_into_the_checkout(tmp_path):
    repo, plain = tmp_path / "repo", tmp_path / "plain"

    def git(*args):
        out = subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=repo,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    for path in ("adaptive_attn/model.py", "results/run/summary.json"):
        (repo / path).parent.mkdir(parents=True)
        (repo / path).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    commit = git("rev-parse", "HEAD")
    (repo / "results/run/summary.json").write_text("1")  # a sweep rewrote a committed run
    assert code_version(repo / "adaptive_attn") == commit
    (repo / "adaptive_attn/model.py").write_text("1")
    assert code_version(repo / "adaptive_attn") == commit + "-dirty"
    plain.mkdir()
    assert code_version(plain) is None


def test_quick_mqar_run_reports_answer_accuracy(compose_cfg):
    cfg = compose_cfg(["experiment=quick", "data=mqar", "model=dense"])
    summary = run(cfg)
    assert summary["status"] == "ok" and 0 <= summary["val_acc"] <= 1 and summary["data"] == "mqar"


def test_failing_run_is_recorded_as_failed(compose_cfg):
    cfg = compose_cfg(["experiment=quick", "data=tinystories", "data.name=/nonexistent/dataset"])
    try:
        run(cfg)
    except Exception:
        pass
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]


EXPERIMENTS = [
    "exp3",
    "exp3_text",
    "exp3_votes",
    "exp3_cpu_synthetic",
    "exp3_cpu_votes",
    "exp3_cpu_text",
    "synthetic_pilot",
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_configs_run_at_tiny_size(compose_cfg, experiment):
    """The study's experiments, checked on the CPU with a tiny model and a few steps of their own data."""
    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.moe.n_routed=2", "model.moe.top_k=1"]
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    seq_len = 256 if experiment == "exp3_cpu_text" else 64  # its query blocks of 32 need a budget above 32 tokens
    cfg = compose_cfg(
        [f"experiment={experiment}", "model=adaptive", *tiny, *steps, "data.batch_size=2", f"seq_len={seq_len}"]
    )
    cfg.module.dense_warmup_steps = 2
    summary = run(cfg)
    assert summary["status"] == "ok" and summary["steps"] == 4 and len(summary["val_curve"]) == 2
    assert summary["equivalent_keep"] < 1  # the sparse stage ran
    assert (Path(cfg.output_dir) / "checkpoints" / "warmup_end.ckpt").is_file()  # where other arms can start
    # the adaptive budget's k against what each test sequence is: its alphabet, or its text domain
    k_vs = pd.read_csv(Path(cfg.output_dir) / "k_vs_difficulty.csv")
    if experiment in ("exp3_text", "exp3_cpu_text"):
        domains = sorted(k_vs["domain"].unique())
        assert domains and sorted(k for k in summary if k.startswith("k_mean_domain_")) == [
            f"k_mean_domain_{d}" for d in domains
        ]
        assert summary[f"k_mean_domain_{domains[0]}"] == pytest.approx(k_vs[k_vs["domain"] == domains[0]]["k"].mean())
    elif experiment in ("exp3_cpu_synthetic", "exp3_cpu_votes", "exp3_votes"):
        task = cfg.data.task
        assert set(k_vs["task"]) == {task} and f"k_difficulty_spearman_{task}" in summary
        assert any(k.startswith(f"acc/{task}/alphabet") for k in summary["val_slices"])


BLOCKS = ["data=text", "seq_len=256", "model.sparse.block_size=8", "model.sparse.query_block=16"]


@pytest.mark.parametrize(
    "arm, data",
    [
        ("adaptive10_lr30", ["data=votes"]),
        ("oracle10", ["data=votes"]),
        ("shuffled10", ["data=votes"]),
        ("adaptive10", BLOCKS),
    ],
)
def test_sparse_arms_of_a_seed_share_their_dense_warm_up_bit_for_bit(compose_cfg, arm, data):
    """A paired difference (same seed) measures the sparse stage alone: through the dense warm-up every
    sparse arm trains the weights fixed10 trains, bit for bit (its own parameters, e.g. a controller, aside),
    in token mode (vote share) and block mode (text)."""
    common = ["experiment=quick", *data, "logger=none", "module.dense_warmup_steps=4", "trainer.max_steps=4"]
    weights = {}
    for model in ("fixed10", arm):
        cfg = compose_cfg([*common, f"model={model}"], run_dir=model)
        assert run(cfg)["status"] == "ok"
        checkpoint = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=False)
        weights[model] = checkpoint["state_dict"]
    shared = weights["fixed10"].keys() & weights[arm].keys()
    assert any("indexer" in key for key in shared)  # the indexer trains in the warm-up, so it is compared too
    assert shared == weights["fixed10"].keys()
    for key in shared:
        assert torch.equal(weights["fixed10"][key], weights[arm][key]), key
