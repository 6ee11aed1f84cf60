import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from adaptive_attn.config import ConfigError, group_options, validate

CHEAP = ["experiment=quick"]


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_option_composes_and_builds(compose_cfg, model):
    cfg = compose_cfg([f"model={model}", *CHEAP])
    validate(cfg)
    net = instantiate(cfg.model)
    logits, _ = net(torch.randint(0, cfg.model.vocab_size, (1, 16)))
    assert logits.shape == (1, 16, cfg.data.vocab_size)


@pytest.mark.parametrize("data", group_options("data"))
def test_every_data_option_composes_and_builds(compose_cfg, data):
    cfg = compose_cfg([f"data={data}", *CHEAP])
    validate(cfg)
    dm = instantiate(cfg.data)
    assert dm.seq_len == cfg.seq_len and dm.vocab_size == cfg.model.vocab_size


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in ("trainer", "logger", "callbacks", "experiment") for o in group_options(g)],
)
def test_every_other_group_option_composes(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    if group in ("logger", "callbacks"):
        for node in (cfg[group] or {}).values():
            assert instantiate(node) is not None
    if group == "trainer" and cfg.trainer.accelerator == "cpu":
        assert instantiate(cfg.trainer, logger=False).max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize(
    "override,needle",
    [
        ("seq_len=0", "seq_len=0 is invalid: must be an integer in [2, 65536]"),
        ("model.n_heads=7", "model.n_heads=7 is invalid: must divide model.d_model=256"),
        ("model.keep=1.5", "model.keep=1.5 is invalid: must be in (0, 1]"),
        ("model.sparse.backend=cuda", "model.sparse.backend='cuda' is invalid"),
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("model=adaptive model.budget.target=1.5", "model.budget.target=1.5 is invalid: must be in (0.02, 1.0)"),
        ("model=adaptive model.budget.query_stride=0", "model.budget.query_stride=0 is invalid: must be an integer"),
        ("model.sparse.backend=flex", "model.sparse.backend=flex does not fit model.sparse.block_size=1"),
        (
            "model.sparse.backend=flex model.sparse.block_size=8",
            "model.sparse.backend=flex does not fit model.sparse.block_size=8, query_block=8: FlexAttention needs",
        ),
    ],
)
def test_bad_values_fail_validation_with_one_line(compose_cfg, override, needle):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["seq_len=0"], "error: seq_len=0 is invalid: must be an integer in [2, 65536]"),
        (["model.n_heads=7"], "error: model.n_heads=7 is invalid: must divide model.d_model=256"),
        (["model=nonsense"], "error: model=nonsense is not an option; choose one of: "),
        (["data.paths=[/no/such/dir]"], "error: data.paths: /no/such/dir does not exist"),
    ],
)
def test_cli_rejects_bad_values_before_training(tmp_path, args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_attn.train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(needle), proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_wandb_is_offline_without_credentials_and_respects_wandb_mode(monkeypatch, tmp_path):
    from adaptive_attn.config import wandb_offline

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not wandb_offline()
