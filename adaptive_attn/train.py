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
from adaptive_attn.lit.callbacks import SparsityStats, SpeedMonitor, peak_memory_bytes


def finish_wandb() -> None:
    """Close the W&B run of this job so the jobs of a sweep never merge into one run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _metric(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if value is not None else None


def build_summary(cfg: DictConfig, trainer: L.Trainer | None, status: str, wall_s: float, extra: dict) -> dict:
    metrics = dict(trainer.callback_metrics) if trainer is not None else {}
    summary = {
        "status": status,
        "model": HydraConfig.get().runtime.choices.get("model"),
        "data": HydraConfig.get().runtime.choices.get("data"),
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "tags": list(cfg.tags),
        "val_loss": _metric(metrics, "val/loss"),
        "val_acc": _metric(metrics, "val/acc"),
        "test_loss": _metric(metrics, "test/loss"),
        "test_acc": _metric(metrics, "test/acc"),
        "steps": trainer.global_step if trainer is not None else 0,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
        "wall_s": wall_s,
        "ended_at": time.time(),
        **extra,
    }
    if trainer is not None:
        for cb in trainer.callbacks:
            if isinstance(cb, SpeedMonitor):
                perf = cb.metrics(trainer.strategy.root_device)
                summary["tokens_per_s"] = perf["perf/tokens_per_s"]
                summary["step_ms"] = perf["perf/step_ms"]
                summary["peak_mem_bytes"] = int(perf["perf/peak_mem_bytes"])
            if isinstance(cb, SparsityStats) and cb.last:
                for name in ("keep_mean", "keep_ratio", "attn_mass_recall", "attn_mass_recall_random", "indexer_kl"):
                    value = cb.last.get(f"val_sparse/{name}", cb.last.get(f"sparse/{name}"))
                    if value is not None:
                        summary[name] = value
                summary["sparsity"] = cb.last
                if "test_sparse/k_difficulty_spearman" in cb.last:
                    summary["k_difficulty_spearman"] = cb.last["test_sparse/k_difficulty_spearman"]
                if cb.k_vs_difficulty is not None and trainer.is_global_zero:
                    cb.k_vs_difficulty.to_csv(Path(cfg.output_dir) / "k_vs_difficulty.csv", index=False)
        summary.setdefault("peak_mem_bytes", peak_memory_bytes(trainer.strategy.root_device))
    if "keep" in cfg.model:
        summary["keep"] = cfg.model.keep
    if cfg.model.get("budget") is not None:
        summary["target"] = cfg.model.budget.target
    summary["config"] = OmegaConf.to_container(cfg, resolve=True)
    return summary


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


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
        L.seed_everything(cfg.seed, workers=True)
        datamodule = instantiate(cfg.data)
        module = instantiate(cfg.module, model=instantiate(cfg.model))
        callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
        loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
        for lg in loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(out_dir))
        if cfg.eval_untrained and cfg.ckpt_path is None:
            extra["untrained_val_loss"] = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if "val/loss" not in trainer.callback_metrics:  # training ended before its first validation
            trainer.validate(module, datamodule=datamodule, verbose=False)
        fit_metrics = dict(trainer.callback_metrics)
        trainer.test(module, datamodule=datamodule, verbose=False)
        trainer.callback_metrics.update({k: v for k, v in fit_metrics.items() if k.startswith("val")})
        summary = build_summary(cfg, trainer, "ok", time.perf_counter() - start, extra)
    except Exception as err:
        extra["error"] = f"{type(err).__name__}: {err}"
        extra["traceback"] = traceback.format_exc()
        if trainer is None or trainer.is_global_zero:
            write_json(
                out_dir / "summary.json", build_summary(cfg, trainer, "failed", time.perf_counter() - start, extra)
            )
        raise
    finally:
        finish_wandb()
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
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
