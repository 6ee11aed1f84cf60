"""Warm start: an arm that begins where a sibling's dense warm-up ended trains as it would from scratch."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from adaptive_attn.config import ConfigError
from adaptive_attn.runner import run
from tests.test_workflow import multirun

COMMON = [
    "experiment=quick",
    "data=votes",
    "module.dense_warmup_steps=3",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",  # a validation where the warm-up ends, which the arm must keep
]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def train_losses(run_dir: Path) -> pd.Series:
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return metrics.dropna(subset=["train/loss"]).set_index("step")["train/loss"]


BLOCKS = ["seq_len=128", "model.sparse.block_size=4", "model.sparse.query_block=8", "data.batch_size=2"]


@pytest.mark.parametrize("arm,mode", [("adaptive10_lr30", []), ("adaptive10", []), ("adaptive10", BLOCKS)])
def test_an_arm_warm_started_from_a_siblings_warm_up_trains_bit_for_bit_as_from_scratch(
    compose_cfg, tmp_path, arm, mode
):
    """adaptive10_lr30's controller trains in a group of its own rate, adaptive10's in the shared groups:
    both must find their optimizer state, schedule and data where the sibling (fixed10) left them. In block
    mode the arm also draws query blocks (`draw_rows`) from where the sibling's checkpoint left its streams."""
    length = 128 if mode else 64
    common = [*COMMON, *mode]
    run(compose_cfg([*common, "model=fixed10"], run_dir=f"fixed10_L{length}_s0"))
    assert (tmp_path / f"fixed10_L{length}_s0" / "checkpoints" / "warmup_end.ckpt").is_file()
    scratch = run(compose_cfg([*common, f"model={arm}"], run_dir="scratch"))
    warm = run(compose_cfg([*common, f"model={arm}", "warm_start=fixed10"], run_dir=f"{arm}_L{length}_s0"))

    assert warm["status"] == "ok" and warm["steps"] == scratch["steps"] == 6
    started = warm["warm_started_from"]
    assert started["steps"] == 3 and started["checkpoint"].endswith(f"fixed10_L{length}_s0/checkpoints/warmup_end.ckpt")
    assert started["own_parameters"] and all(".budget." in name for name in started["own_parameters"])
    ours, theirs = final_weights(tmp_path / f"{arm}_L{length}_s0"), final_weights(tmp_path / "scratch")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert warm["val_loss"] == scratch["val_loss"]
    assert [(p["step"], p["loss"], p["acc"]) for p in warm["val_curve"]] == [
        (p["step"], p["loss"], p["acc"]) for p in scratch["val_curve"]
    ]
    assert [p["step"] for p in warm["val_curve"]] == [3, 6]
    # the log holds the sibling's warm-up rows, then this run's own: the same losses as from scratch
    pd.testing.assert_series_equal(train_losses(tmp_path / f"{arm}_L{length}_s0"), train_losses(tmp_path / "scratch"))

    # and it did start from the sibling's checkpoint: a nudge to one of its weights reaches the result
    nudged = torch.load(tmp_path / f"fixed10_L{length}_s0" / "checkpoints" / "warmup_end.ckpt", weights_only=False)
    key = next(k for k in nudged["state_dict"] if k.endswith("lm_head.weight") or "embed" in k)
    nudged["state_dict"][key] += 1e-3
    source = tmp_path / "nudged_fixed10" / "checkpoints" / "warmup_end.ckpt"
    source.parent.mkdir(parents=True)
    torch.save(nudged, source)
    (source.parent.parent / "run_config.yaml").write_bytes(
        (tmp_path / f"fixed10_L{length}_s0" / "run_config.yaml").read_bytes()
    )
    moved = run(compose_cfg([*common, f"model={arm}", f"warm_start={source}"], run_dir="nudged"))
    assert moved["steps"] == 6 and moved["val_loss"] != scratch["val_loss"]


def test_warm_start_refuses_a_missing_checkpoint_another_run_or_a_step_past_the_warm_up(compose_cfg, tmp_path):
    with pytest.raises(SystemExit):  # a single run stops with its one-line error
        run(compose_cfg([*COMMON, "model=adaptive10", "warm_start=fixed10"], run_dir="adaptive10_L64_s0"))
    run(compose_cfg([*COMMON, "model=fixed10", "seed=1"], run_dir="fixed10_L64_s0"))  # another seed, same name

    from adaptive_attn.warm_start import warm_start_source

    cfg = compose_cfg([*COMMON, "model=adaptive10", "warm_start=fixed10"], run_dir="adaptive10_L64_s0")
    with pytest.raises(ConfigError, match="seed: 1 -> 0"):
        warm_start_source(cfg, Path(cfg.output_dir))
    last = tmp_path / "fixed10_L64_s0" / "checkpoints" / "last.ckpt"  # step 6, past the warm-up of 3
    cfg = compose_cfg([*COMMON, "model=adaptive10", "seed=1", f"warm_start={last}"], run_dir="adaptive10_L64_s1")
    with pytest.raises(ConfigError, match="at step 6, past module.dense_warmup_steps=3"):
        warm_start_source(cfg, Path(cfg.output_dir))


def test_a_sweep_of_a_sibling_and_its_arms_warm_starts_the_arms_alone(tmp_path):
    """`model=fixed10,adaptive10,dense warm_start=fixed10`: the jobs run in turn, so the arm finds fixed10's
    warm-up; fixed10 itself and dense (no warm-up) ignore the key."""
    multirun(tmp_path, *COMMON, "logger=none", "model=fixed10,adaptive10,dense", "warm_start=fixed10")
    summaries = {p.parent.name: json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")}
    assert {name: s["status"] for name, s in summaries.items()} == {
        "0_fixed10_L64_s0": "ok",
        "1_adaptive10_L64_s0": "ok",
        "2_dense_L64_s0": "ok",
    }
    started = summaries["1_adaptive10_L64_s0"]["warm_started_from"]
    assert started["steps"] == 3 and "0_fixed10_L64_s0" in started["checkpoint"]
    assert "warm_started_from" not in summaries["0_fixed10_L64_s0"] | summaries["2_dense_L64_s0"]


@pytest.mark.parametrize("experiment", ["exp3", "exp3_cpu_synthetic", "exp3_cpu_text", "exp3_cpu_votes_2048", "quick"])
def test_the_study_experiments_save_the_warm_up_end(compose_cfg, experiment):
    """Their sparse arms can then start from a sibling's warm-up, whichever callbacks they use (run at tiny
    size in tests/test_train.py)."""
    cfg = compose_cfg([f"experiment={experiment}", "model=fixed10"])
    targets = [c._target_.rsplit(".", 1)[-1] for c in cfg.callbacks.values()]
    assert "WarmupEndCheckpoint" in targets, targets
    # after the convergence tracker, whose state it saves with the validation at the warm-up's last step
    assert targets.index("WarmupEndCheckpoint") > targets.index("ConvergenceTracker"), targets


def test_a_resumed_warm_started_run_still_records_where_it_started(tmp_path):
    from adaptive_attn.runner import resumed_summary

    started = {"checkpoint": "fixed10_L64_s0/checkpoints/warmup_end.ckpt", "steps": 3, "own_parameters": ["a"]}
    earlier = {"status": "interrupted", "steps": 5, "wall_s": 2.0, "warm_started_from": started}
    (tmp_path / "summary.json").write_text(json.dumps(earlier))
    assert resumed_summary(tmp_path)["warm_started_from"] == started
