"""One training run: build from the config, fit, test, and leave summary.json (status ok, failed or
interrupted). `adaptive_attn.train` checks a config before it loads any of this."""

import json
import sys
import time
import traceback
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from adaptive_attn.config import ConfigError, fail
from adaptive_attn.lit.interrupt import GracefulInterrupt, RunInterrupted
from adaptive_attn.resume import checked_resume, differences, drop_rows_past, record_run
from adaptive_attn.summary import build_summary, write_json, write_k_vs_difficulty
from adaptive_attn.warm_start import branch, copy_logged_rows, warm_start_source


def finish_wandb() -> None:
    """Close the W&B run of this job so the jobs of a sweep never merge into one run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build(cfg: DictConfig, out_dir: Path) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, model=instantiate(cfg.model))
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    if not loggers:  # a learning-rate monitor has nowhere to write
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    callbacks.append(GracefulInterrupt(str(out_dir / "checkpoints" / "last.ckpt")))
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir))
    return datamodule, module, trainer


def fit_and_test(cfg: DictConfig, datamodule, module, trainer: L.Trainer, checkpoint: str | None, extra: dict):
    if cfg.eval_untrained and checkpoint is None:
        extra["untrained_val_loss"] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint)
    for cb in trainer.callbacks:
        if isinstance(cb, GracefulInterrupt):  # a signal in the last step
            cb.raise_if_stopped(trainer)
    if "val/loss" not in trainer.callback_metrics:  # training ended before its first validation
        trainer.validate(module, datamodule=datamodule, verbose=False)
    fit_metrics = dict(trainer.callback_metrics)
    trainer.test(module, datamodule=datamodule, verbose=False)
    trainer.callback_metrics.update({k: v for k, v in fit_metrics.items() if k.startswith("val")})


def read_summary(out_dir: Path) -> dict:
    """The summary.json a run left in out_dir ({} when there is none, or it cannot be read)."""
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ok_summary(out_dir: Path) -> dict | None:
    """The summary of a run that finished in out_dir (status ok), if there is one."""
    summary = read_summary(out_dir)
    return summary if summary.get("status") == "ok" else None


def resumed_summary(out_dir: Path) -> dict:
    """What a resumed run keeps from the summary its earlier process left (a process killed outright
    leaves none): when the run started, its untrained val loss, the warm-up it started from, and in
    `resumed_from` one entry per earlier process (status, steps, code version, and wall seconds so far,
    which this run's wall_s continues)."""
    earlier = read_summary(out_dir)
    carried = {k: earlier[k] for k in ("started_at", "untrained_val_loss", "warm_started_from") if k in earlier}
    before = {key: earlier.get(key) for key in ("status", "steps", "code_version", "wall_s")}
    return {**carried, "resumed_from": [*earlier.get("resumed_from", []), before]}


def finished_summary(cfg: DictConfig, out_dir: Path) -> dict | None:
    """A sweep job (or any run with `ckpt_path=auto`) whose directory already holds this run's summary,
    status ok: its summary (the job is skipped, so a re-run finishes only what is missing)."""
    skips = cfg.ckpt_path == "auto" or (HydraConfig.get().mode == RunMode.MULTIRUN and cfg.ckpt_path is None)
    if not skips:
        return None
    summary = ok_summary(out_dir)
    if summary is None:
        return None
    differ = differences(cfg, out_dir)
    if differ:
        raise ConfigError(f"{out_dir} holds a finished run of another config: {differ}")
    return summary


def preflight(cfg: DictConfig, out_dir: Path) -> tuple[str | None, dict | None, tuple[Path, dict] | None]:
    """Every check of a run before any work -> (the checkpoint to resume from, the summary of a finished run
    to skip, the warm-up to start from); ConfigError naming what is wrong."""
    checkpoint = checked_resume(cfg, out_dir)
    done = finished_summary(cfg, out_dir)
    warm = warm_start_source(cfg, out_dir) if checkpoint is None and done is None else None
    return checkpoint, done, warm


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; leaves summary.json (status ok, failed or interrupted)."""
    start, trainer, extra = time.perf_counter(), None, {"started_at": time.time()}
    out_dir = Path(cfg.output_dir)
    try:
        checkpoint, done, warm = preflight(cfg, out_dir)
    except ConfigError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            fail(str(err))  # a single run stops here, before any work
        extra["error"] = f"ConfigError: {err}"
        if ok_summary(out_dir) is None:  # never over a finished run's summary
            write_json(out_dir / "summary.json", build_summary(cfg, None, "failed", time.perf_counter() - start, extra))
        raise
    if done is not None:
        print(f"skipped: {out_dir} already finished (status ok)", file=sys.stderr)
        return done
    if checkpoint is not None:
        extra.update(resumed_summary(out_dir))
        start -= extra["resumed_from"][-1]["wall_s"] or 0.0
        drop_rows_past(checkpoint, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_run(cfg, out_dir)
    try:
        if warm is not None:
            copy_logged_rows(warm, out_dir)
        datamodule, module, trainer = build(cfg, out_dir)
        if warm is not None:  # its own checkpoint from then on, so a resume continues this run
            checkpoint, extra["warm_started_from"] = branch(warm, module, out_dir)
        fit_and_test(cfg, datamodule, module, trainer, checkpoint, extra)
        summary = build_summary(cfg, trainer, "ok", time.perf_counter() - start, extra)
    except Exception as err:
        interrupted = isinstance(err, RunInterrupted)
        extra.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if interrupted:
            extra.update(checkpoint=err.checkpoint, resume_with="ckpt_path=last")
        if trainer is None or trainer.is_global_zero:
            status = "interrupted" if interrupted else "failed"
            ended = build_summary(cfg, trainer, status, time.perf_counter() - start, extra)
            write_json(out_dir / "summary.json", ended)
        raise
    finally:
        finish_wandb()
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        write_k_vs_difficulty(trainer, out_dir)
        write_json(out_dir / "summary.json", summary)
    return summary
