"""Convergence: the validation curve of a run, and when it first reaches given levels."""

import time

import lightning as L


class ConvergenceTracker(L.Callback):
    """The validation curve of a fit: step, training wall seconds, val loss and accuracy at every validation
    (the experiments validate every 5% of a run). `summary()` reads the steps and seconds until accuracy
    first reaches each of `acc_levels` (loss first falls to each of `loss_levels`, for text) and the area
    under the curve (the mean over the run, by trapezoids over steps)."""

    def __init__(self, acc_levels=(0.5, 0.9, 0.99), loss_levels=()):
        self.acc_levels, self.loss_levels = list(acc_levels), list(loss_levels)
        self.curve: list[dict[str, float]] = []
        self.train_seconds, self._start = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._start

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit" or "val/loss" not in trainer.callback_metrics:
            return
        point = {"step": trainer.global_step, "wall_s": self.train_seconds}
        point.update({k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("loss", "acc")})
        self.curve = [p for p in self.curve if p["step"] < point["step"]] + [point]

    def summary(self) -> dict:
        out: dict = {"val_curve": self.curve}
        if len(self.curve) > 1:
            steps = [p["step"] for p in self.curve]
            for key in ("acc", "loss"):
                values = [p[key] for p in self.curve]
                area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:]))
                out[f"val_{key}_auc"] = area / (steps[-1] - steps[0])
        for level in self.acc_levels:
            out.update(self._first(f"acc_{level}", lambda p, level=level: p["acc"] >= level))
        for level in self.loss_levels:
            out.update(self._first(f"loss_{level}", lambda p, level=level: p["loss"] <= level))
        return out

    def _first(self, name: str, reached) -> dict:
        hit = next((p for p in self.curve if reached(p)), None)
        return {f"steps_to_{name}": hit and hit["step"], f"wall_s_to_{name}": hit and hit["wall_s"]}

    def state_dict(self):
        return {"curve": self.curve, "train_seconds": self.train_seconds}

    def load_state_dict(self, state):
        self.curve, self.train_seconds = state["curve"], state["train_seconds"]
