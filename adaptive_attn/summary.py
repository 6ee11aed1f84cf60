"""summary.json: what a run leaves behind (status, config, final metrics, slices, convergence, speed, memory,
sparsity), built from the trainer and its callbacks."""

import json
import os
import subprocess
import time
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from adaptive_attn.data.atomic import write_atomically
from adaptive_attn.data.domains import TEXT_DOMAINS
from adaptive_attn.data.synthetic import TASKS
from adaptive_attn.lit.callbacks import SparsityStats, SpeedMonitor, peak_memory_bytes
from adaptive_attn.lit.convergence import ConvergenceTracker
from adaptive_attn.process import device_name

SUMMARY_SPARSITY = ("equivalent_keep", "pairs_share", "attn_mass_recall", "attn_mass_recall_random", "indexer_kl")


PACKAGE_DIR = Path(__file__).resolve().parent


def code_version(where: Path = PACKAGE_DIR) -> str | None:
    """The commit of the checkout at `where` (the package's), "-dirty" when a tracked file outside `results/`
    has uncommitted changes: runs write their results into the checkout, and those do not change the code.
    None outside git."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not commit:
        return None
    return commit + "-dirty" if changed else commit


CODE_VERSION = code_version()  # at import: a sweep's later jobs run the code its process loaded


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
            summary["device"] = device_name(trainer.strategy.root_device)  # what the times were measured on
            summary["peak_mem_bytes"] = int(perf["perf/peak_mem_bytes"])
        if isinstance(cb, ConvergenceTracker):
            summary.update(cb.summary())
        if isinstance(cb, SparsityStats) and cb.last:
            for name in SUMMARY_SPARSITY:
                value = cb.last.get(f"val_sparse/{name}", cb.last.get(f"sparse/{name}"))
                if value is not None:
                    summary[name] = value
            summary["sparsity"] = cb.last
            for name in [f"k_difficulty_spearman/{task}" for task in TASKS] + [
                f"k_mean/domain_{d}" for d in TEXT_DOMAINS
            ]:
                if f"test_sparse/{name}" in cb.last:
                    summary[name.replace("/", "_")] = cb.last[f"test_sparse/{name}"]
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
        "code_version": CODE_VERSION,
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
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))
