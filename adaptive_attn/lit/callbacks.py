"""Lightning callbacks: speed and memory, and per-layer sparsity statistics."""

import os
import resource
import sys
import time
from collections import defaultdict

import lightning as L
import pandas as pd
import torch

from adaptive_attn.data.domains import TEXT_DOMAINS
from adaptive_attn.data.synthetic import TASKS
from adaptive_attn.lit.breakdown import attribute, shares


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; the process's peak resident set size on CPU (since the process
    started, so jobs sharing a process share it: `SpeedMonitor` samples one job's own peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); the process peak where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_memory_bytes(torch.device("cpu"))


class SpeedMonitor(L.Callback):
    """Logs training tokens/s and step time and peak memory. The first `skip_steps` steps (start-up) are
    left out of the speed, unless the run has no other steps. With `breakdown_every` = N, every N-th step
    is profiled and each component's share of it logged (`perf/share/<component>`; see `breakdown.py`)."""

    def __init__(self, skip_steps: int = 5, log_every_n_steps: int = 10, breakdown_every: int = 0):
        self.skip_steps, self.log_every, self.breakdown_every = skip_steps, log_every_n_steps, breakdown_every
        self._profiler = None
        self.tokens = self.steps = self.early_tokens = self.early_steps = 0
        self.seconds = self.early_seconds = 0.0
        self.peak_rss = 0  # this job's largest resident set size, sampled after each step (CPU)
        self._start = 0.0

    def on_fit_start(self, trainer, pl_module):
        if trainer.strategy.root_device.type == "cuda":  # jobs of a sweep in one process: each its own peak
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.breakdown_every and trainer.global_step % self.breakdown_every == self.breakdown_every - 1:
            self._profiler = torch.autograd.profiler.profile(use_kineto=False)
            self._profiler.__enter__()
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            parts = shares(attribute(self._profiler.function_events, 1000 * elapsed))
            pl_module.log_dict({f"perf/share/{name}": value for name, value in parts.items()})
            self._profiler = None
            return  # a profiled step is slower: left out of the speed
        self.peak_rss = max(self.peak_rss, current_rss_bytes())
        tokens = (batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0] * trainer.world_size
        if trainer.global_step <= self.skip_steps:
            self.early_tokens, self.early_seconds, self.early_steps = (
                self.early_tokens + tokens,
                self.early_seconds + elapsed,
                self.early_steps + 1,
            )
            return
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + elapsed, self.steps + 1
        if trainer.global_step % self.log_every == 0:
            pl_module.log_dict(self.metrics(trainer.strategy.root_device))

    def metrics(self, device: torch.device) -> dict[str, float]:
        tokens, seconds, steps = (
            (self.tokens, self.seconds, self.steps)
            if self.steps
            else (self.early_tokens, self.early_seconds, self.early_steps)
        )
        return {
            "perf/tokens_per_s": tokens / max(seconds, 1e-9),
            "perf/step_ms": 1000 * seconds / max(steps, 1),
            "perf/peak_mem_bytes": float(peak_memory_bytes(device) if device.type == "cuda" else self.peak_rss),
        }

    def state_dict(self):
        names = ("tokens", "seconds", "steps", "early_tokens", "early_seconds", "early_steps")
        return {name: getattr(self, name) for name in names}

    def load_state_dict(self, state):
        for name, value in state.items():
            setattr(self, name, value)


def layer_scalars(sparsity: list[dict] | None) -> dict[str, dict[int, float]]:
    """{stat name: {layer: value}} for every scalar statistic of a step's DSA layers (aux["sparsity"])."""
    stats: dict[str, dict[int, float]] = defaultdict(dict)
    for i, layer in enumerate(sparsity or []):
        for name, value in layer.items():
            if torch.is_tensor(value) and value.numel() == 1:
                stats[name][i] = float(value)
    return stats


def step_sparsity(outputs) -> list[dict]:
    """The DSA layers' statistics a training, validation or test step returned (none for dense models)."""
    return (outputs.get("sparsity") if isinstance(outputs, dict) else None) or []


def with_layer_means(prefix: str, stats: dict[str, dict[int, float]]) -> dict[str, float]:
    flat = {}
    for name, per_layer in stats.items():
        flat.update({f"{prefix}/{name}/layer{i}": v for i, v in per_layer.items()})
        flat[f"{prefix}/{name}"] = sum(per_layer.values()) / len(per_layer)
    return flat


class SparsityStats(L.Callback):
    """Logs the statistics the DSA layers return with each step: every `log_every_n_steps` training steps
    (pairs share, equivalent keep, k mean/std/min/max, indexer KL, budget multiplier or top-p, controller
    features and weights, W&B histograms of k), means over the validation set (with attention-mass recall
    against a random selection of the same size), and on the test set each sequence's k against its
    difficulty."""

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every = log_every_n_steps
        self._val: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._difficulty: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self.k_vs_difficulty: pd.DataFrame | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sparsity = step_sparsity(outputs)
        if trainer.global_step % self.log_every or not sparsity:
            return
        metrics = with_layer_means("sparse", layer_scalars(sparsity))
        for i, layer in enumerate(sparsity):
            k = layer.get("k_per_sequence")
            if k is not None and k.numel() > 1:
                metrics.update({f"sparse/k_{f}/layer{i}": float(getattr(k, f)()) for f in ("std", "min", "max")})
        pl_module.log_dict(metrics)
        self.last.update(metrics)
        self.log_k_histograms(trainer, sparsity)

    @staticmethod
    def log_k_histograms(trainer, sparsity: list[dict]) -> None:
        """W&B histograms of each layer's k (only when a W&B logger is attached)."""
        for lg in trainer.loggers:
            if type(lg).__name__ != "WandbLogger":
                continue
            import wandb

            hists = {
                f"sparse/k_hist/layer{i}": wandb.Histogram(layer["k_values"].cpu().numpy())
                for i, layer in enumerate(sparsity)
                if "k_values" in layer
            }
            if hists:
                lg.experiment.log(hists, step=trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for name, per_layer in layer_scalars(step_sparsity(outputs)).items():
            for i, v in per_layer.items():
                self._val[name][i].append(v)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._val or trainer.sanity_checking:
            return
        means = {name: {i: sum(v) / len(v) for i, v in per_layer.items()} for name, per_layer in self._val.items()}
        metrics = with_layer_means("val_sparse", means)
        pl_module.log_dict(metrics)
        self.last.update(metrics)

    def on_test_epoch_start(self, trainer, pl_module):
        self._difficulty.clear()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        """Pair each sequence's k (mean over its rows and the layers) with what it is: its task and
        difficulty (synthetic tasks) or its text domain."""
        ks = [layer["k_per_sequence"] for layer in step_sparsity(outputs) if "k_per_sequence" in layer]
        if not ks or not ("difficulty" in batch or "domain" in batch):
            return
        per_layer = torch.stack(ks, dim=1).tolist()  # [B, layers]
        if "difficulty" in batch:
            kinds = [
                {"task": TASKS[t], "difficulty": d}
                for t, d in zip(batch["task"].tolist(), batch["difficulty"].tolist())
            ]
        else:
            kinds = [{"task": "text", "domain": TEXT_DOMAINS[d]} for d in batch["domain"].tolist()]
        for kind, k in zip(kinds, per_layer):
            self._difficulty.append({**kind, "k": sum(k) / len(k), **{f"k_layer{i}": v for i, v in enumerate(k)}})

    def on_test_epoch_end(self, trainer, pl_module):
        """Spearman correlation of k with difficulty, per task (recall: pairs; counting, votes: alphabet size,
        where a smaller alphabet needs more keys); on text, the mean k of each domain."""
        if not self._difficulty:
            return
        self.k_vs_difficulty = frame = pd.DataFrame(self._difficulty)
        results = {}
        if "difficulty" in frame:
            for task, rows in frame.groupby("task"):
                results[f"k_difficulty_spearman/{task}"] = rows["difficulty"].corr(rows["k"], method="spearman")
        if "domain" in frame:
            results.update({f"k_mean/domain_{d}": rows["k"].mean() for d, rows in frame.groupby("domain")})
        for name, value in results.items():
            if value == value:  # a rank correlation is undefined (NaN) when k does not vary, as for fixed budgets
                self.last[f"test_sparse/{name}"] = float(value)
                pl_module.log(f"test_sparse/{name}", float(value))
