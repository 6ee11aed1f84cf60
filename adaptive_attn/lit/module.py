"""SparseLMModule: next-token training of an MoELLM with the DSA indexer protocol."""

import math

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

IGNORE = -100


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L + 1] -> inputs [B, L], targets [B, L]; the only place labels are shifted.

    Targets outside `target_mask` (MQAR: everything but the answers) are set to IGNORE.
    """
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if "target_mask" in batch:
        targets = targets.masked_fill(~batch["target_mask"], IGNORE)
    return inputs, targets


class SparseLMModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 50,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        indexer_kl_weight: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_loss = torchmetrics.MeanMetric()
        self.val_acc = torchmetrics.MeanMetric()

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    def lm_loss(self, batch) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        inputs, targets = split_batch(batch)
        logits, aux = self.model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        return loss, aux, logits, targets

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.model.set_training_step(self.global_step)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        lm, aux, _, _ = self.lm_loss(batch)
        loss = lm + aux["balance_loss"]
        if "indexer_kl" in aux:
            loss = loss + self.hparams.indexer_kl_weight * aux["indexer_kl"]
            self.log("train/indexer_kl", aux["indexer_kl"])
        self.log("train/loss", lm, prog_bar=True)
        self.log("train/balance_loss", aux["balance_loss"])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # non-gradient updates (router biases, budget multipliers) belong to the step, so they happen
        # before callbacks such as ModelCheckpoint see it
        self.model.after_training_step()

    def _eval_step(self, batch) -> None:
        loss, _, logits, targets = self.lm_loss(batch)
        scored = targets != IGNORE
        n = scored.sum()
        self.val_loss.update(loss, weight=n)
        self.val_acc.update((logits.argmax(-1) == targets)[scored].float().mean(), weight=n)

    def _eval_epoch_end(self, prefix: str) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {f"{prefix}/loss": loss, f"{prefix}/ppl": torch.exp(loss), f"{prefix}/acc": self.val_acc.compute()},
            prog_bar=prefix == "val",
        )
        self.val_loss.reset()
        self.val_acc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
