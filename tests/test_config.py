import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adaptive_attn.config import ConfigError, group_options, validate
from adaptive_attn.lit.interrupt import GracefulInterrupt
from adaptive_attn.runner import build

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
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():  # rejected up front: see NEEDS_GPU
        return
    validate(cfg)
    if group in ("logger", "callbacks"):
        for node in (cfg[group] or {}).values():
            assert instantiate(node) is not None
    if group == "trainer" and cfg.trainer.accelerator == "cpu":
        assert instantiate(cfg.trainer, logger=False).max_steps == cfg.trainer.max_steps


BAD_VALUES = [
    ("seq_len=0", "seq_len=0 is invalid: must be an integer in [2, 65536]"),
    ("model.n_heads=7", "model.n_heads=7 is invalid: must divide model.d_model=256"),
    ("model.rope_dim=3", "model.rope_dim=3 is invalid: must be even"),
    ("model.moe.top_k=9", "model.moe.top_k=9 is invalid: must be an integer in [1, 8]"),
    ("model.short_conv=-1", "model.short_conv=-1 is invalid: must be an integer >= 0"),
    ("model.keep=1.5", "model.keep=1.5 is invalid: must be in (0, 1]"),
    (
        "experiment=research_text model=fixed25 seq_len=512",
        "model.keep=0.25 at seq_len=512 is invalid: its 128 tokens are no more than the 128 of a query block's own",
    ),
    (
        "model=adaptive10 seq_len=256 model.sparse.block_size=16 model.sparse.query_block=32",
        "model.budget.target=0.1 at",
    ),
    ("model=fixed_k model.k=16 model.sparse.block_size=16", "model.k=16 at seq_len=256 is invalid: its 16 tokens"),
    ("model.keep=null", "model.keep=None and model.k=None are invalid: give exactly one of them"),
    ("model=fixed_k model.k=0", "model.k=0 is invalid: must be an integer >= 1 (tokens)"),
    ("model=adaptive model.budget.target=1.5", "model.budget.target=1.5 is invalid: must be in (0.02, 1.0)"),
    ("model=adaptive model.budget.query_stride=0", "model.budget.query_stride=0 is invalid: must be an integer"),
    ("model=adaptive model.budget.lr_scale=0", "model.budget.lr_scale=0 is invalid: must be a number in (0, 1000]"),
    ("model=adaptive model.budget.learn_level=2", "model.budget.learn_level=2 is invalid: must be true or false"),
    ("model.sparse.backend=cuda", "model.sparse.backend='cuda' is invalid: choose one of reference, torch"),
    ("model.sparse.backend=flex", "model.sparse.backend=flex does not fit model.sparse.block_size=1"),
    (
        "model.sparse.backend=flex model.sparse.block_size=8",
        "model.sparse.backend=flex does not fit model.sparse.block_size=8, query_block=8: FlexAttention needs",
    ),
    ("model.sparse.block_size=0", "model.sparse.block_size=0 is invalid: must be an integer in [1, 4096]"),
    ("model.sparse.query_block=0", "model.sparse.query_block=0 is invalid: must be a positive multiple"),
    ("model.sparse.block_size=8 model.sparse.query_block=12", "model.sparse.query_block=12 is invalid"),
    ("model.sparse.sink_tokens=-2", "model.sparse.sink_tokens=-2 is invalid: must be an integer >= 0"),
    ("model.sparse.kl_row_fraction=0", "model.sparse.kl_row_fraction=0 is invalid: must be a number in (0, 1]"),
    ("model.sparse.indexer.rope_dim=3", "model.sparse.indexer.rope_dim=3 is invalid: must be an even integer"),
    ("module.lr=-1", "module.lr=-1 is invalid: must be a number in (0, 1]"),
    ("module.lr=abc", "module.lr='abc' is invalid: must be a number in (0, 1]"),
    ("module.min_lr_ratio=2", "module.min_lr_ratio=2 is invalid: must be a number in [0, 1]"),
    ("module.dense_warmup_steps=-1", "module.dense_warmup_steps=-1 is invalid: must be an integer >= 0"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is invalid: must be an integer >= 1"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is invalid: must be an integer >= 1"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 is invalid: must be an integer >= 1"),
    ("callbacks.speed.breakdown_every=-1", "callbacks.speed.breakdown_every=-1 is invalid: must be an integer >= 0"),
    ("eval_untrained=maybe", "eval_untrained='maybe' is invalid: must be true or false"),
    ("model.head_dim=0", "model.head_dim=0 is invalid: must be an integer >= 1"),
    ("model.q_rank=-1", "model.q_rank=-1 is invalid: must be an integer >= 0"),
    ("model=adaptive model.budget.lo=0.9 model.budget.hi=0.1", "model.budget.lo=0.9 is invalid: must be below"),
    ("model=adaptive model.budget.dual_lr=-1", "model.budget.dual_lr=-1 is invalid: must be a number in [0, inf)"),
    ("model=adaptive_topp model.budget.p_init=0", "model.budget.p_init=0 is invalid: must be a number in (0, 1]"),
    ("trainer.precision=fp8", "trainer.precision='fp8' is invalid: choose one of 32-true, bf16-mixed"),
    ("trainer.devices=0", "trainer.devices=0 is invalid with trainer.accelerator=cpu: must be auto or an integer"),
    ("trainer.devices=[0]", "trainer.devices=[0] is invalid with trainer.accelerator=cpu"),
    ("data.batch_size=0", "data.batch_size=0 is invalid: must be an integer >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 is invalid: must be an integer >= 0"),
    ("data.tokenizer=words", "data.tokenizer='words' is invalid: choose byte or bpe"),
    ("data=mqar data.max_pairs=0", "data.max_pairs=0 is invalid: must be an integer in [1, seq_len // 4 = 64]"),
    ("data=mqar data.min_pairs=20 data.max_pairs=10", "data.min_pairs=20 is invalid"),
    ("data=mqar data.vocab_size=200", "data.vocab_size=200 is invalid: must be >= seq_len + 18"),
    ("data=counting data.alphabets=[0]", "data.alphabets=[0] is invalid: each must be an integer in [1,"),
    ("data=counting data.count_cap=16", "data.count_cap=16 is invalid: must be an integer in [1, 15]"),
    ("data=recall_count data.task=sorting", "data.task='sorting' is invalid: choose one of recall, counting"),
]
# what this machine cannot run: checked up front as well
NEEDS_GPU = [
    ("trainer=gpu", "trainer.accelerator=gpu needs a CUDA GPU and this machine has none"),
    ("trainer=ddp", "trainer.accelerator=gpu needs a CUDA GPU and this machine has none"),
    ("model.sparse.backend=triton", "model.sparse.backend=triton needs training on a CUDA GPU"),
    ("model.sparse.backend=flex model.sparse.block_size=16", "model.sparse.backend=flex needs training on a CUDA GPU"),
]


@pytest.mark.parametrize(
    "override,needle", BAD_VALUES + ([] if torch.cuda.is_available() else NEEDS_GPU), ids=lambda v: v[:40]
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
        (["module.lr=abc"], "error: module.lr='abc' is invalid"),
        (["data.num_workers=-1"], "error: data.num_workers=-1 is invalid"),
        (["ckpt_path=last"], "error: ckpt_path=last: no checkpoints/last.ckpt in "),
        (["trainer.precision=fp8"], "error: trainer.precision='fp8' is invalid"),
        (["model=fixed25", "warm_start=fixed10"], "error: warm_start=fixed10: no file "),
    ]
    + ([] if torch.cuda.is_available() else [(["trainer=gpu"], "error: trainer.accelerator=gpu needs a CUDA GPU")]),
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
    assert not (tmp_path / "run").exists()  # nothing written, not even the run directory


def test_entry_point_loads_lightning_only_after_the_checks():
    """A rejected run answers before Lightning loads (about 2 s instead of 9 on a small CPU): nothing the
    checks import may pull it in."""
    probe = "import sys, adaptive_attn.train; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_cli_checks_a_run_in_its_default_directory_before_training(tmp_path):
    """Without `hydra.run.dir` the check resolves the default one, which names the model through Hydra's
    runtime choices: a bad value still gets its one line, and no `outputs/` is created."""
    proc = subprocess.run(
        [sys.executable, "-m", "adaptive_attn.train", "model.n_heads=7"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: model.n_heads=7 is invalid"), proc.stderr
    assert "\n" not in proc.stderr.strip() and not (tmp_path / "outputs").exists()


def test_wandb_is_offline_without_credentials_or_server_and_respects_wandb_mode(monkeypatch, tmp_path, capsys):
    from adaptive_attn import config
    from adaptive_attn.config import wandb_offline

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_offline()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    assert wandb_offline() and "does not answer: logging offline" in capsys.readouterr().err
    monkeypatch.setattr(config, "wandb_reachable", lambda: True)
    assert not wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline()
    monkeypatch.setenv("WANDB_MODE", "online")
    assert not wandb_offline()


def test_a_dense_model_in_a_sweep_with_sparse_settings_is_valid(compose_cfg):
    """An experiment's sparse settings (sinks, blocks) are for the sparse models of its sweep; dense ignores them."""
    cfg = compose_cfg(["experiment=exp3_cpu_synthetic", "model=dense"])
    assert cfg.model.sparse.sink_tokens == 1
    validate(cfg)
    assert not list(instantiate(cfg.model).sparse_layers())


@pytest.mark.parametrize("seq_len,batch", [(256, 32), (512, 16), (2048, 4)])
def test_vote_share_study_holds_its_tokens_per_batch_at_every_length(compose_cfg, seq_len, batch):
    cfg = compose_cfg(["experiment=exp3_cpu_votes", f"seq_len={seq_len}"])
    assert cfg.data.batch_size == batch
    validate(cfg)


def test_vote_share_from_l512_differs_from_the_l256_protocol_only_in_its_warm_up(compose_cfg):
    """exp3_cpu_votes_long: exp3_cpu_votes at L=512 with the indexer's dense warm-up over half the run."""
    short = OmegaConf.to_container(compose_cfg(["experiment=exp3_cpu_votes", "seq_len=512"]), resolve=True)
    cfg = compose_cfg(["experiment=exp3_cpu_votes_long"])
    validate(cfg)
    long = OmegaConf.to_container(cfg, resolve=True)
    assert long["seq_len"] == 512 and long["module"]["dense_warmup_steps"] == long["trainer"]["max_steps"] // 2
    assert long["hydra"]["sweep"] == short["hydra"]["sweep"]  # the same results folder and job names
    short["module"]["dense_warmup_steps"] = long["module"]["dense_warmup_steps"]
    assert {k: v for k, v in long.items() if k != "hydra"} == {k: v for k, v in short.items() if k != "hydra"}


@pytest.mark.parametrize(
    "experiment",
    [
        "exp3_cpu_synthetic",
        "exp3_cpu_text",
        "exp3_cpu_votes",
        "exp3_cpu_votes_long",
        "exp3_cpu_votes_1024",
        "exp3_cpu_votes_2048",
    ],
)
def test_the_study_experiments_build_their_trainer(compose_cfg, experiment, tmp_path):
    """Each CPU experiment's callbacks and trainer settings agree (a ModelCheckpoint with checkpointing
    turned off, say, would stop every job when it starts)."""
    _, _, trainer = build(compose_cfg([f"experiment={experiment}", "model=fixed10"]), tmp_path)
    assert any(isinstance(cb, GracefulInterrupt) for cb in trainer.callbacks)


@pytest.mark.parametrize(
    "experiment,shorter,seq_len,batch",
    [("exp3_cpu_votes_1024", "exp3_cpu_votes_long", 1024, 8), ("exp3_cpu_votes_2048", "exp3_cpu_votes_1024", 2048, 4)],
)
def test_vote_share_at_longer_lengths_doubles_the_run_and_its_warm_up(compose_cfg, experiment, shorter, seq_len, batch):
    """exp3_cpu_votes_1024 and _2048: the protocol of the length below at twice the length, in twice the
    steps, half of them dense warm-up."""
    base = OmegaConf.to_container(compose_cfg([f"experiment={shorter}", f"seq_len={seq_len}"]), resolve=True)
    cfg = compose_cfg([f"experiment={experiment}"])
    validate(cfg)
    long = OmegaConf.to_container(cfg, resolve=True)
    periodic = long["callbacks"].pop("model_checkpoint", None)  # jobs of hours: a checkpoint every 200 steps
    if seq_len >= 2048:
        assert (
            periodic["every_n_train_steps"] == 200 and periodic["save_last"] and long["trainer"]["enable_checkpointing"]
        )
        assert periodic["enable_version_counter"] is False  # it overwrites the last.ckpt a SIGTERM wrote
    else:
        assert periodic is None
    assert long["seq_len"] == seq_len and long["data"]["batch_size"] == batch
    assert long["trainer"]["max_steps"] == long["data"]["train_steps"] == 2 * base["trainer"]["max_steps"]
    assert long["module"]["dense_warmup_steps"] == long["trainer"]["max_steps"] // 2
    assert long["trainer"]["val_check_interval"] == long["trainer"]["max_steps"] // 20
    assert long["hydra"]["sweep"] == base["hydra"]["sweep"]
    scaled = [("trainer", "max_steps"), ("trainer", "val_check_interval"), ("data", "train_steps")]
    for group, key in [*scaled, ("trainer", "enable_checkpointing")]:
        base[group][key] = long[group][key]
    base["module"]["dense_warmup_steps"] = long["module"]["dense_warmup_steps"]
    assert {k: v for k, v in long.items() if k != "hydra"} == {k: v for k, v in base.items() if k != "hydra"}
