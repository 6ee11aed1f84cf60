"""Up-front config checks: a bad key or value stops the run with one line naming it and what is allowed."""

import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from adaptive_attn.ops.sparse_attention import BACKENDS, FLEX_TILE, flex_fits

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "trainer", "logger", "callbacks", "experiment", "hydra/launcher")
MAX_SEQ_LEN = 65536


def wandb_offline() -> bool:
    """`${wandb_offline:}`: W&B runs offline unless it can log in. WANDB_MODE wins when set; otherwise
    online only with an API key (WANDB_API_KEY or ~/.netrc)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    netrc = Path.home() / ".netrc"
    return not (os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text()))


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)


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


def _int_in(cfg: DictConfig, key: str, lo: int, hi: int | None = None) -> int:
    value = cfg_get(cfg, key)
    bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi),
        f"{key}={value!r} is invalid: must be an integer {bounds}",
    )
    return value


def cfg_get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, DictConfig) else None
    return node


def validate(cfg: DictConfig) -> None:
    """Check every value a run depends on; raises ConfigError with one line."""
    seq_len = _int_in(cfg, "seq_len", 2, MAX_SEQ_LEN)
    _int_in(cfg, "seed", 0)
    m = cfg.model
    d_model = _int_in(cfg, "model.d_model", 1)
    n_heads = _int_in(cfg, "model.n_heads", 1)
    _require(
        d_model % n_heads == 0 or m.get("head_dim"),
        f"model.n_heads={n_heads} is invalid: must divide model.d_model={d_model} (e.g. "
        f"{', '.join(str(h) for h in range(1, d_model + 1) if d_model % h == 0 and h <= 32)})",
    )
    _int_in(cfg, "model.n_layers", 1)
    rope_dim = _int_in(cfg, "model.rope_dim", 2)
    _require(rope_dim % 2 == 0, f"model.rope_dim={rope_dim} is invalid: must be even")
    _int_in(cfg, "model.kv_rank", 1)
    n_routed = _int_in(cfg, "model.moe.n_routed", 1)
    _int_in(cfg, "model.moe.top_k", 1, n_routed)
    _int_in(cfg, "model.vocab_size", 2)
    if "keep" in m:
        keep = m.keep
        _require(isinstance(keep, (int, float)) and 0 < keep <= 1, f"model.keep={keep!r} is invalid: must be in (0, 1]")
    if m.get("budget") is not None:
        target = m.budget.get("target")
        lo, hi = m.budget.get("lo", 0.0), m.budget.get("hi", 1.0)
        _require(
            isinstance(target, (int, float)) and lo < target < hi,
            f"model.budget.target={target!r} is invalid: must be in ({lo}, {hi})",
        )
        if "query_stride" in m.budget:
            _int_in(cfg, "model.budget.query_stride", 1)
    if m.get("sparse") is not None:
        s = m.sparse
        block = _int_in(cfg, "model.sparse.block_size", 1, 4096)
        qb = s.get("query_block") or block
        _require(
            isinstance(qb, int) and qb % block == 0,
            f"model.sparse.query_block={qb!r} is invalid: must be a positive multiple of block_size={block}",
        )
        _require(s.backend in BACKENDS, f"model.sparse.backend={s.backend!r} is invalid: choose one of {BACKENDS}")
        _require(
            not (s.backend == "triton" and block > 1) and not (s.backend == "flex" and block == 1),
            f"model.sparse.backend={s.backend} does not fit model.sparse.block_size={block}: "
            "triton is token-level (block_size=1), flex is block-level (block_size > 1)",
        )
        _require(
            s.backend != "flex" or flex_fits(block, qb),
            f"model.sparse.backend=flex does not fit model.sparse.block_size={block}, query_block={qb}: "
            f"FlexAttention needs multiples of {FLEX_TILE}",
        )
        _int_in(cfg, "model.sparse.warmup_steps", 0)
        _int_in(cfg, "model.sparse.indexer.n_heads", 1)
        head_dim = _int_in(cfg, "model.sparse.indexer.head_dim", 2)
        _int_in(cfg, "model.sparse.indexer.rope_dim", 2, head_dim)
    d = cfg.data
    _int_in(cfg, "data.batch_size", 1)
    for p in d.get("paths") or []:
        _require(Path(p).exists(), f"data.paths: {p} does not exist (give existing files or directories)")
    if d.get("max_pairs") is not None or d.get("min_pairs") is not None:
        hi = seq_len // 4
        mx = d.get("max_pairs") or hi
        _require(1 <= mx <= hi, f"data.max_pairs={mx} is invalid: must be in [1, seq_len // 4 = {hi}]")
        mn = d.get("min_pairs") or max(1, mx // 8)
        _require(1 <= mn <= mx, f"data.min_pairs={mn} is invalid: must be in [1, data.max_pairs = {mx}]")
    if "min_pairs" in d:
        _require(seq_len >= 4, f"seq_len={seq_len} is invalid for data=mqar: must be >= 4")
    _int_in(cfg, "trainer.max_steps", 1)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
