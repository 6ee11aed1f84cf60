"""SparseLMModule: next-token training of an MoELLM with the DSA indexer protocol."""

import math
from collections import defaultdict

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from adaptive_attn.lit.metrics import EvalSlices

IGNORE = -100


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L + 1] -> inputs [B, L], targets [B, L]; the only place labels are shifted.

    Synthetic tasks bring their own `targets` (aligned with the inputs: counting labels positions with
    counts); targets outside `target_mask` (recall: everything but the answers) are set to IGNORE.
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], batch.get("targets", tokens[:, 1:])
    if "target_mask" in batch:
        targets = targets.masked_fill(~batch["target_mask"], IGNORE)
    return inputs, targets


class SparseLMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.1,
        lr_warmup_steps: int = 50,
        dense_warmup_steps: int = 30,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        indexer_kl_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self._step_sparsity: list[dict] | None = None  # the DSA layers' statistics of the current step
        self.val_loss = torchmetrics.MeanMetric()
        self.val_acc = torchmetrics.MeanMetric()
        self.slices = EvalSlices()

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    def lm_loss(
        self, batch, reduction: str = "mean"
    ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, aux, logits [N, V] and targets [N] at the N scored positions, scored [B, L]); the head
        runs at the scored positions only (synthetic tasks score a few)."""
        inputs, targets = split_batch(batch)
        scored = targets != IGNORE
        logits, aux = self.model(inputs, where=scored)
        loss = F.cross_entropy(logits.float(), targets[scored], reduction=reduction)
        return loss, aux, logits, targets[scored], scored

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # DSA's first stage: dense attention while the indexer learns from whole rows
        self.model.set_sparse_stage(self.global_step >= self.hparams.dense_warmup_steps)

    def training_step(self, batch, batch_idx: int) -> dict:
        """-> the loss, and each DSA layer's statistics of the step ("sparsity", for callbacks)"""
        lm, aux, *_ = self.lm_loss(batch)
        loss = lm + aux["balance_loss"]
        if "indexer_kl" in aux:
            loss = loss + self.hparams.indexer_kl_weight * aux["indexer_kl"]
            self.log("train/indexer_kl", aux["indexer_kl"])
        self.log("train/loss", lm, prog_bar=True)
        self.log("train/balance_loss", aux["balance_loss"])
        self._step_sparsity = aux.get("sparsity")
        return {"loss": loss, "sparsity": self._step_sparsity}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # non-gradient updates (router biases, budget multipliers) belong to the step, so they happen
        # before callbacks such as ModelCheckpoint see it
        self.model.after_training_step(self._step_sparsity)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["draw_states"] = [dsa.draw_states() for dsa in self.model.sparse_layers()]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # the DSA layers' random streams continue where they were (checkpoints from before they were saved:
        # as freshly seeded)
        for dsa, states in zip(self.model.sparse_layers(), checkpoint.get("draw_states", [])):
            dsa.load_draw_states(states)

    def _eval_step(self, batch) -> dict:
        losses, aux, logits, targets, scored = self.lm_loss(batch, reduction="none")
        correct = (logits.argmax(-1) == targets).float()
        self.val_loss.update(losses.mean(), weight=len(losses))
        self.val_acc.update(correct.mean(), weight=len(losses))
        self.slices.update(batch, losses, correct, scored)
        sparsity = aux.get("sparsity") or []
        selections = [layer.pop("selected") for layer in sparsity if "selected" in layer]
        if "need_id" in batch and selections:
            self.slices.update_needed_recall(batch, selections, scored)
        return {"sparsity": sparsity}

    def _eval_epoch_end(self, prefix: str) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {f"{prefix}/loss": loss, f"{prefix}/ppl": torch.exp(loss), f"{prefix}/acc": self.val_acc.compute()},
            prog_bar=prefix == "val",
        )
        self.log_dict({f"{prefix}_slices/{name}": value for name, value in self.slices.compute().items()})
        self.val_loss.reset()
        self.val_acc.reset()
        self.slices.reset()

    def validation_step(self, batch, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def optimizer_groups(self) -> list[dict]:
        """AdamW's parameter groups, each parameter with its name (so that a checkpoint's optimizer state can
        be matched to another model's parameters: `warm_start`): decayed matrices, the rest, and one group
        per own rate. An adaptive budget's controller may train at its own rate (`lr_scale`): it learns in
        the sparse stage alone, where Adam moves each of its few parameters by about lr per step at most."""
        own_rate = {
            id(p): m.lr_scale
            for m in self.model.modules()
            if getattr(m, "lr_scale", 1.0) != 1.0
            for p in m.parameters()
        }
        decay, no_decay, scaled = [], [], defaultdict(list)
        for name, p in self.model.named_parameters(prefix="model"):
            if id(p) in own_rate:
                scaled[own_rate[id(p)]].append((name, p))
            else:
                (decay if p.dim() >= 2 else no_decay).append((name, p))
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return groups + [{"params": ps, "weight_decay": 0.0, "lr": self.hparams.lr * k} for k, ps in scaled.items()]

    def configure_optimizers(self):
        groups = self.optimizer_groups()
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = self.hparams.lr_warmup_steps, self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
