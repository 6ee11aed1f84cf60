"""Resuming a run in its own directory: which checkpoint, and whether it is the same run.

Every run records what defines it (`run_config.yaml`: model, data, seq_len, seed, optimiser) in its
directory. A resume (`ckpt_path=last`, `auto` or a checkpoint file) must agree with that record; `last` must
find `checkpoints/last.ckpt` there, `auto` resumes it where there is one and starts afresh where not. Both
are checked before anything is written.
"""

import csv
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from adaptive_attn.config import ConfigError, validate
from adaptive_attn.data.atomic import write_atomically

IDENTITY = ("model", "data", "seq_len", "seed", "module")  # what makes a run this run
RECORD = "run_config.yaml"


def checkpoint_to_resume(cfg: DictConfig, out_dir: Path) -> str | None:
    """ckpt_path: null (a fresh run), `last` (this run directory's last checkpoint), `auto` (that checkpoint
    if there is one, else a fresh run) or a checkpoint file -> the file to resume from; ConfigError when
    `last` or the file is not there."""
    if cfg.ckpt_path is None:
        return None
    path = out_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path in ("last", "auto") else Path(cfg.ckpt_path)
    if not path.is_file():
        if cfg.ckpt_path == "auto":
            return None
        where = f"no checkpoints/last.ckpt in {out_dir}" if cfg.ckpt_path == "last" else f"no file {path}"
        hint = "resume in the run's directory: hydra.run.dir=<run dir>"
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: {where} ({hint})")
    return str(path)


def identity(cfg: DictConfig) -> dict:
    """The keys that define a run, flattened (unresolved: `${trainer.max_steps}` stays a reference)."""
    flat: dict = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    walk("", {k: OmegaConf.to_container(cfg, resolve=False).get(k) for k in IDENTITY})
    return flat


def differences(cfg: DictConfig, out_dir: Path, may_differ: tuple[str, ...] = ()) -> str | None:
    """How cfg differs from the run recorded in out_dir, keys starting with one of `may_differ` aside (None
    when it does not, or nothing is recorded)."""
    record = out_dir / RECORD
    if not record.is_file():
        return None
    before, now = identity(OmegaConf.load(record)), identity(cfg)
    differ = sorted(
        k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and not k.startswith(may_differ)
    )
    if not differ:
        return None
    groups: dict[str, list[str]] = {}  # by their first two components: model.sparse.* in one entry
    for key in sorted(differ, key=lambda k: (k.count("."), k)):
        groups.setdefault(".".join(key.split(".")[:2]), []).append(key)
    return ", ".join(
        f"{keys[0]}: {before.get(keys[0])!r} -> {now.get(keys[0])!r}"
        if keys == [group]
        else f"{group}.* ({len(keys)} keys)"
        for group, keys in groups.items()
    )


def check_same_run(cfg: DictConfig, out_dir: Path, checkpoint: str | None) -> None:
    """A resume (`checkpoint`, from checkpoint_to_resume) continues the run recorded in out_dir: ConfigError
    listing every key that differs."""
    differ = differences(cfg, out_dir) if checkpoint is not None else None
    if differ:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: this config differs from the run in {out_dir}: {differ}")


def checked_resume(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checks that need no Lightning: every config value, then the checkpoint a resume names, which must
    be there and continue the run recorded in out_dir -> that checkpoint (None for a fresh run)."""
    validate(cfg)
    checkpoint = checkpoint_to_resume(cfg, out_dir)
    check_same_run(cfg, out_dir, checkpoint)
    return checkpoint


def record_run(cfg: DictConfig, out_dir: Path) -> None:
    """Write what defines the run, once (a resume leaves the record as it was)."""
    record = out_dir / RECORD
    if not record.exists():
        identity = OmegaConf.create({k: OmegaConf.to_container(cfg, resolve=False)[k] for k in IDENTITY})
        write_atomically(record, lambda tmp: OmegaConf.save(identity, tmp))


def drop_rows_past(checkpoint: str, out_dir: Path) -> None:
    """A process killed outright (SIGKILL, a lost node) may have logged steps after its last checkpoint, which
    the run resumed from that checkpoint logs again: csv/metrics.csv keeps the rows before its step."""
    log = out_dir / "csv" / "metrics.csv"
    if log.is_file():
        step = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False)["global_step"]
        keep_rows_before(log, step, log)


def keep_rows_before(source: Path, step: int, target: Path) -> None:
    """Write the rows of the metrics.csv `source` logged before `step`, under its header, to `target` (which
    may be `source` itself)."""
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row.get("step") and int(row["step"]) < step]
        fields = reader.fieldnames or []

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(target, write)  # a process killed while rewriting the log in place must not lose it
