"""Lightning callbacks: speed and memory, and per-layer sparsity statistics."""

import resource
import sys
import time
from collections import defaultdict

import lightning as L
import torch


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class SpeedMonitor(L.Callback):
    """Logs training tokens/s and step time (first `skip_steps` steps excluded) and peak memory."""

    def __init__(self, skip_steps: int = 5, log_every_n_steps: int = 10):
        self.skip_steps, self.log_every = skip_steps, log_every_n_steps
        self.tokens = 0
        self.seconds = 0.0
        self.steps = 0
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        if trainer.global_step <= self.skip_steps:
            return
        self.tokens += (batch["tokens"].shape[1] - 1) * batch["tokens"].shape[0] * trainer.world_size
        self.seconds += elapsed
        self.steps += 1
        if trainer.global_step % self.log_every == 0:
            pl_module.log_dict(self.metrics(trainer.strategy.root_device))

    def metrics(self, device: torch.device) -> dict[str, float]:
        return {
            "perf/tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "perf/step_ms": 1000 * self.seconds / max(self.steps, 1),
            "perf/peak_mem_bytes": float(peak_memory_bytes(device)),
        }

    def state_dict(self):
        return {"tokens": self.tokens, "seconds": self.seconds, "steps": self.steps}

    def load_state_dict(self, state):
        self.tokens, self.seconds, self.steps = state["tokens"], state["seconds"], state["steps"]


class SparsityStats(L.Callback):
    """Per-layer DSA statistics: realised keep ratio, k, indexer KL every `log_every_n_steps` training
    steps, and attention-mass recall (share of dense attention mass inside the selection) over the
    validation set."""

    def __init__(self, log_every_n_steps: int = 10, recall_on_validation: bool = True):
        self.log_every, self.recall_on_validation = log_every_n_steps, recall_on_validation
        self._val: dict[str, list[float]] = defaultdict(list)
        self.last: dict[str, float] = {}

    @staticmethod
    def layers(pl_module) -> list:
        return list(pl_module.model.sparse_layers())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.log_every:
            return
        metrics = {}
        for i, dsa in enumerate(self.layers(pl_module)):
            for name in ("keep_ratio", "k_mean", "indexer_kl"):
                if name in dsa.last_stats:
                    metrics[f"sparse/{name}/layer{i}"] = float(dsa.last_stats[name])
        if metrics:
            for name in ("keep_ratio", "k_mean", "indexer_kl"):
                vals = [v for k, v in metrics.items() if k.startswith(f"sparse/{name}/")]
                if vals:
                    metrics[f"sparse/{name}"] = sum(vals) / len(vals)
            pl_module.log_dict(metrics)
            self.last.update(metrics)

    def on_validation_epoch_start(self, trainer, pl_module):
        self._val.clear()
        for dsa in self.layers(pl_module):
            dsa.track_recall = self.recall_on_validation

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for i, dsa in enumerate(self.layers(pl_module)):
            for name in ("attn_mass_recall", "attn_mass_recall_random", "keep_ratio"):
                if name in dsa.last_stats:
                    self._val[f"val_sparse/{name}/layer{i}"].append(float(dsa.last_stats[name]))

    def on_validation_epoch_end(self, trainer, pl_module):
        for dsa in self.layers(pl_module):
            dsa.track_recall = False
        if not self._val or trainer.sanity_checking:
            return
        metrics = {k: sum(v) / len(v) for k, v in self._val.items()}
        for name in ("attn_mass_recall", "attn_mass_recall_random", "keep_ratio"):
            vals = [v for k, v in metrics.items() if k.startswith(f"val_sparse/{name}/")]
            if vals:
                metrics[f"sparse/{name}"] = sum(vals) / len(vals)
        pl_module.log_dict(metrics)
        self.last.update(metrics)
