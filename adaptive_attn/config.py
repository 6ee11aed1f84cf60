"""Up-front config checks: a bad key or value stops the run with one line naming it and what is allowed."""

import os
import socket
import sys
import urllib.parse
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from adaptive_attn.data.tasks import check_synthetic
from adaptive_attn.data.text import check_tokenizer
from adaptive_attn.ops.dispatch import check_backend
from adaptive_attn.ops.layout import check_blocks
from adaptive_attn.sparse.budget import budget_tokens, check_keep, check_selects_blocks, check_target
from adaptive_attn.sparse.controller import check_query_stride
from adaptive_attn.sparse.indexer import check_rope_dim

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "trainer", "logger", "callbacks", "experiment", "hydra/launcher")
MAX_SEQ_LEN = 65536
# Lightning's precisions (those of transformer-engine left out: not a dependency)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether W&B's server answers a TCP connection within `timeout` seconds."""
    url = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def wandb_offline() -> bool:
    """`${wandb_offline:}`: W&B runs offline unless it can log in and reach its server. WANDB_MODE wins
    when set; otherwise online only with an API key (WANDB_API_KEY or ~/.netrc) and a server that answers
    within a few seconds (else one line says why it runs offline)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    netrc = Path.home() / ".netrc"
    if not (os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())):
        return True
    if not wandb_reachable():
        print("wandb: an API key is set but the W&B server does not answer: logging offline", file=sys.stderr)
        return True
    return False


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
# e.g. a batch of a fixed number of tokens at any length: ${floordiv:8192,${seq_len}}
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


class ConfigError(ValueError):
    """A config value outside its allowed range; the message is one line."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_overrides(argv: list[str]) -> None:
    """`model=foo` for an option that does not exist -> ConfigError (before Hydra composes)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or key == "hydra/launcher" and not (CONF_DIR / key).exists():
            continue
        options = group_options(key)
        if key == "hydra/launcher":
            options += ["basic", "joblib", "submitit_local", "submitit_slurm"]
        for choice in value.split(","):
            if choice not in options and choice != "null":
                raise ConfigError(f"{key}={choice} is not an option; choose one of: {', '.join(options)}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _whole(value, lo: int) -> bool:
    """Whether value is an integer (not a boolean) of at least lo."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _int_in(cfg: DictConfig, key: str, lo: int, hi: int | None = None) -> int:
    value = cfg_get(cfg, key)
    bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    _require(
        _whole(value, lo) and (hi is None or value <= hi), f"{key}={value!r} is invalid: must be an integer {bounds}"
    )
    return value


def cfg_get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def _number_in(cfg: DictConfig, key: str, lo: float, hi: float | None = None, lo_open: bool = False) -> float:
    value = cfg_get(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
    bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
    _require(ok, f"{key}={value!r} is invalid: must be a number in {bounds}")
    return value


def _rule(check, *args) -> None:
    """A rule that lives with the code it governs (ValueError naming the key) -> ConfigError, same words."""
    try:
        check(*args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def is_dense(cfg: DictConfig) -> bool:
    """Whether the configured model is dense (no sparse stage, so no sparse settings and no warm-up)."""
    return cfg.model._target_.endswith("DenseMoELLM")


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on; raises ConfigError with one line."""
    seq_len = _int_in(cfg, "seq_len", 2, MAX_SEQ_LEN)
    _int_in(cfg, "seed", 0)
    _validate_architecture(cfg)
    if "keep" in cfg.model:
        _rule(check_keep, cfg.model.keep, cfg.model.get("k"))
    if cfg.model.get("budget") is not None:
        _validate_budget(cfg)
    if cfg.model.get("sparse") is not None and not is_dense(cfg):
        _validate_sparse(cfg)  # a dense model ignores a sweep's sparse settings
    _validate_data(cfg, seq_len)
    _validate_training(cfg)
    _validate_machine(cfg)


def _validate_architecture(cfg: DictConfig) -> None:
    d_model = _int_in(cfg, "model.d_model", 1)
    n_heads = _int_in(cfg, "model.n_heads", 1)
    _require(
        d_model % n_heads == 0 or cfg.model.get("head_dim"),
        f"model.n_heads={n_heads} is invalid: must divide model.d_model={d_model} (e.g. "
        f"{', '.join(str(h) for h in range(1, d_model + 1) if d_model % h == 0 and h <= 32)})",
    )
    _int_in(cfg, "model.n_layers", 1)
    rope_dim = _int_in(cfg, "model.rope_dim", 2)
    _require(rope_dim % 2 == 0, f"model.rope_dim={rope_dim} is invalid: must be even")
    for key in ("model.head_dim", "model.v_head_dim"):  # null: d_model / n_heads, and head_dim
        if cfg_get(cfg, key) is not None:
            _int_in(cfg, key, 1)
    _int_in(cfg, "model.q_rank", 0)
    _int_in(cfg, "model.kv_rank", 1)
    _int_in(cfg, "model.short_conv", 0)
    n_routed = _int_in(cfg, "model.moe.n_routed", 1)
    _int_in(cfg, "model.moe.top_k", 1, n_routed)
    _int_in(cfg, "model.vocab_size", 2)


def _validate_training(cfg: DictConfig) -> None:
    _number_in(cfg, "module.lr", 0, 1, lo_open=True)
    _number_in(cfg, "module.min_lr_ratio", 0, 1)
    _int_in(cfg, "module.lr_warmup_steps", 0)
    _int_in(cfg, "module.dense_warmup_steps", 0)
    _number_in(cfg, "module.weight_decay", 0)
    _number_in(cfg, "module.indexer_kl_weight", 0)
    _int_in(cfg, "trainer.max_steps", 1)
    _int_in(cfg, "trainer.val_check_interval", 1)
    _int_in(cfg, "trainer.log_every_n_steps", 1)
    if cfg_get(cfg, "callbacks.speed") is not None:
        _int_in(cfg, "callbacks.speed.breakdown_every", 0)
    eval_untrained = cfg.get("eval_untrained", False)
    _require(isinstance(eval_untrained, bool), f"eval_untrained={eval_untrained!r} is invalid: must be true or false")
    for key in ("trainer.limit_val_batches", "trainer.limit_test_batches"):
        _number_in(cfg, key, 0, lo_open=True)
    _number_in(cfg, "trainer.gradient_clip_val", 0)
    precision = cfg_get(cfg, "trainer.precision")
    _require(
        str(precision) in PRECISIONS,
        f"trainer.precision={precision!r} is invalid: choose one of {', '.join(PRECISIONS)}",
    )
    _check_devices(cfg)


def _check_devices(cfg: DictConfig) -> None:
    """trainer.devices as Lightning takes it: on a CPU a process count, on GPUs also -1 (all) or indices."""
    devices, accelerator = cfg_get(cfg, "trainer.devices"), cfg_get(cfg, "trainer.accelerator")
    indices = isinstance(devices, ListConfig) and len(devices) > 0 and all(_whole(d, 0) for d in devices)
    on_cpu = accelerator == "cpu"
    allowed = "auto or an integer >= 1" if on_cpu else "auto, -1 (all), an integer >= 1 or a list of GPU indices"
    _require(
        devices == "auto" or _whole(devices, 1) or not on_cpu and (devices == -1 or indices),
        f"trainer.devices={devices!r} is invalid with trainer.accelerator={accelerator}: must be {allowed}",
    )


def _validate_machine(cfg: DictConfig) -> None:
    """What this machine can run: a GPU for GPU trainers and the fused kernels, a backward for flex."""
    import torch

    accelerator = cfg.trainer.get("accelerator")
    has_gpu = torch.cuda.is_available()
    _require(
        accelerator not in ("gpu", "cuda") or has_gpu,
        f"trainer.accelerator={accelerator} needs a CUDA GPU and this machine has none (use trainer=cpu)",
    )
    backend = cfg_get(cfg, "model.sparse.backend")
    on_gpu = accelerator in ("gpu", "cuda") or accelerator == "auto" and has_gpu
    _require(
        backend not in ("triton", "flex") or on_gpu,
        f"model.sparse.backend={backend} needs training on a CUDA GPU (flex has no CPU backward; triton kernels "
        "are compiled for GPUs): use backend=torch or auto on the CPU",
    )


def _validate_budget(cfg: DictConfig) -> None:
    budget = cfg.model.budget
    if "lo" in budget and "hi" in budget:
        lo, hi = _number_in(cfg, "model.budget.lo", 0, 1), _number_in(cfg, "model.budget.hi", 0, 1, lo_open=True)
        _require(lo < hi, f"model.budget.lo={lo} is invalid: must be below model.budget.hi={hi}")
    _rule(check_target, budget.get("target"), budget.get("lo", 0.0), budget.get("hi", 1.0))
    for key in ("dual_lr", "lr"):  # the dual ascent's step (the controller's, top-p's)
        if key in budget:
            _number_in(cfg, f"model.budget.{key}", 0)
    if "p_init" in budget:
        _number_in(cfg, "model.budget.p_init", 0, 1, lo_open=True)
    if "reference_len" in budget:
        _int_in(cfg, "model.budget.reference_len", 2)
    if "query_stride" in budget:
        _rule(check_query_stride, budget.query_stride)
    if "lr_scale" in budget:
        _number_in(cfg, "model.budget.lr_scale", 0, 1000, lo_open=True)
    if "learn_level" in budget:
        value = budget.learn_level
        _require(isinstance(value, bool), f"model.budget.learn_level={value!r} is invalid: must be true or false")


def _validate_sparse(cfg: DictConfig) -> None:
    s = cfg.model.sparse
    block = s.get("block_size")
    query_block = block if s.get("query_block") is None else s.query_block
    _rule(check_blocks, block, query_block)
    _rule(check_backend, s.backend, block, query_block)
    for key in ("model.keep", "model.k", "model.budget.target"):
        value = cfg_get(cfg, key)
        if value is not None:
            tokens = value if key == "model.k" else budget_tokens(value, cfg.seq_len)
            _rule(check_selects_blocks, f"{key}={value} at seq_len={cfg.seq_len}", tokens, block, query_block)
            break
    _int_in(cfg, "model.sparse.sink_tokens", 0)
    _number_in(cfg, "model.sparse.kl_row_fraction", 0, 1, lo_open=True)
    _number_in(cfg, "model.sparse.rank_row_fraction", 0, 1, lo_open=True)
    _int_in(cfg, "model.sparse.indexer.n_heads", 1)
    head_dim = _int_in(cfg, "model.sparse.indexer.head_dim", 2)
    _rule(check_rope_dim, s.indexer.get("rope_dim"), head_dim)


def _validate_data(cfg: DictConfig, seq_len: int) -> None:
    d = cfg.data
    _int_in(cfg, "data.batch_size", 1)
    _int_in(cfg, "data.num_workers", 0)
    for p in d.get("paths") or []:
        _require(Path(p).exists(), f"data.paths: {p} does not exist (give existing files or directories)")
    if "tokenizer" in d or d._target_.endswith(("HFTextDataModule", "TextDomainsDataModule")):
        _rule(check_tokenizer, d.get("tokenizer", "byte"), d.vocab_size)
    if "task" in d:
        args = [d.get(k) for k in ("min_pairs", "max_pairs")] + [d.get("alphabets", ()), d.get("count_cap", 15)]
        _rule(check_synthetic, d.task, seq_len, d.vocab_size, *args)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
