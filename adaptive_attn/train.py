"""Training entry point: compose config -> validate -> instantiate -> fit -> test -> summary.json.

    GOMP_SPINCOUNT=0 python -m adaptive_attn.train [model=fixed25] [data=mqar] [seq_len=512] [seed=1] ...
    GOMP_SPINCOUNT=0 python -m adaptive_attn.train -m model=adaptive,fixed25,fixed50 seq_len=64,128 seed=0,1,2

(GOMP_SPINCOUNT=0 stops idle OpenMP threads from spinning; on small CPUs it doubles throughput.)
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from adaptive_attn.config import ConfigError, check_group_overrides, fail, validate
from adaptive_attn.data.synthetic import TASKS
from adaptive_attn.lit.callbacks import SparsityStats, SpeedMonitor, peak_memory_bytes

SUMMARY_SPARSITY = ("equivalent_keep", "pairs_share", "attn_mass_recall", "attn_mass_recall_random", "indexer_kl")


def finish_wandb() -> None:
    """Close the W&B run of this job so the jobs of a sweep never merge into one run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None


def callback_summary(trainer: L.Trainer) -> dict:
    """Speed, memory and sparsity figures the callbacks measured."""
    summary = {}
    for cb in trainer.callbacks:
        if isinstance(cb, SpeedMonitor):
            perf = cb.metrics(trainer.strategy.root_device)
            summary.update(tokens_per_s=perf["perf/tokens_per_s"], step_ms=perf["perf/step_ms"])
            summary["peak_mem_bytes"] = int(perf["perf/peak_mem_bytes"])
        if isinstance(cb, SparsityStats) and cb.last:
            for name in SUMMARY_SPARSITY:
                value = cb.last.get(f"val_sparse/{name}", cb.last.get(f"sparse/{name}"))
                if value is not None:
                    summary[name] = value
            summary["sparsity"] = cb.last
            for task in TASKS:
                if f"test_sparse/k_difficulty_spearman/{task}" in cb.last:
                    summary[f"k_difficulty_spearman_{task}"] = cb.last[f"test_sparse/k_difficulty_spearman/{task}"]
    summary.setdefault("peak_mem_bytes", peak_memory_bytes(trainer.strategy.root_device))
    return summary


def slice_summary(metrics: dict) -> dict:
    """Evaluation slices (position buckets, task x difficulty, needed-key recall) of validation and test."""
    summary = {}
    for split in ("val", "test"):
        prefix = f"{split}_slices/"
        slices = {k.removeprefix(prefix): float(v) for k, v in metrics.items() if k.startswith(prefix)}
        if slices:
            summary[f"{split}_slices"] = slices
    if "needed_recall" in summary.get("val_slices", {}):
        summary["needed_recall"] = summary["val_slices"]["needed_recall"]
    return summary


def build_summary(cfg: DictConfig, trainer: L.Trainer | None, status: str, wall_s: float, extra: dict) -> dict:
    """The contents of summary.json."""
    metrics = dict(trainer.callback_metrics) if trainer is not None else {}
    choices = HydraConfig.get().runtime.choices
    summary = {
        "status": status,
        "model": choices.get("model"),
        "data": choices.get("data"),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "tags": list(cfg.tags),
        **{name.replace("/", "_"): _metric(metrics, name) for name in ("val/loss", "val/acc", "test/loss", "test/acc")},
        **slice_summary(metrics),
        "steps": trainer.global_step if trainer is not None else 0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        "wall_s": wall_s,
        "ended_at": time.time(),
        **extra,
        **(callback_summary(trainer) if trainer is not None else {}),
    }
    if "keep" in cfg.model:
        summary["keep"] = cfg.model.keep
        summary["k"] = cfg.model.get("k")
    if cfg.model.get("budget") is not None:
        summary["target"] = cfg.model.budget.target
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    return summary


def write_k_vs_difficulty(trainer: L.Trainer, out_dir: Path) -> None:
    """Each test sequence's k against its difficulty, where the sparsity callback paired them."""
    for cb in trainer.callbacks:
        if isinstance(cb, SparsityStats) and cb.k_vs_difficulty is not None:
            cb.k_vs_difficulty.to_csv(out_dir / "k_vs_difficulty.csv", index=False)


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def build(cfg: DictConfig, out_dir: Path) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module, model=instantiate(cfg.model))
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir))
    return datamodule, module, trainer


def fit_and_test(cfg: DictConfig, datamodule, module, trainer: L.Trainer, extra: dict) -> None:
    if cfg.eval_untrained and cfg.ckpt_path is None:
        extra["untrained_val_loss"] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if "val/loss" not in trainer.callback_metrics:  # training ended before its first validation
        trainer.validate(module, datamodule=datamodule, verbose=False)
    fit_metrics = dict(trainer.callback_metrics)
    trainer.test(module, datamodule=datamodule, verbose=False)
    trainer.callback_metrics.update({k: v for k, v in fit_metrics.items() if k.startswith("val")})


def run(cfg: DictConfig) -> dict:
    """Train and evaluate one configuration; always leaves summary.json (status ok or failed)."""
    start, trainer, extra = time.perf_counter(), None, {"started_at": time.time()}
    out_dir = Path(cfg.output_dir)
    try:
        validate(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            fail(str(err))  # a single run stops here, before any work, leaving nothing behind
        out_dir.mkdir(parents=True, exist_ok=True)
        extra["error"] = f"ConfigError: {err}"
        write_json(out_dir / "summary.json", build_summary(cfg, None, "failed", time.perf_counter() - start, extra))
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        datamodule, module, trainer = build(cfg, out_dir)
        fit_and_test(cfg, datamodule, module, trainer, extra)
        summary = build_summary(cfg, trainer, "ok", time.perf_counter() - start, extra)
    except Exception as err:
        extra.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        if trainer is None or trainer.is_global_zero:
            failed = build_summary(cfg, trainer, "failed", time.perf_counter() - start, extra)
            write_json(out_dir / "summary.json", failed)
        raise
    finally:
        finish_wandb()
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        write_k_vs_difficulty(trainer, out_dir)
        write_json(out_dir / "summary.json", summary)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except Exception as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # in a sweep one failing job must not stop the others: it is recorded as failed in its summary.json
        print(f"job failed ({type(err).__name__}: {err}); recorded in {cfg.output_dir}/summary.json", file=sys.stderr)
        return
    untrained = summary.get("untrained_val_loss", float("nan"))
    if rank_zero_only.rank == 0:
        print(
            f"done: val_loss={summary['val_loss']:.4f} (untrained {untrained:.4f}) "
            f"tokens/s={summary.get('tokens_per_s', 0):.0f} -> {cfg.output_dir}/summary.json"
        )


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    torch.set_float32_matmul_precision("high")
    # CPU arithmetic on subnormal floats (tiny indexer-loss gradients) is many times slower; flush them
    torch.set_flush_denormal(True)
    _hydra_main()


if __name__ == "__main__":
    main()
