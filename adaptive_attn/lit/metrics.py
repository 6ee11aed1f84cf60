"""Evaluation by slice: loss and accuracy per position bucket, accuracy per task and difficulty, and
needed-key recall (the share of the positions a query needs that its selection holds) per layer,
task and difficulty."""

from collections import defaultdict

import torch

from adaptive_attn.data.domains import TEXT_DOMAINS
from adaptive_attn.data.synthetic import TASKS, needed_mask

POSITION_BUCKETS = 4  # quarters of the sequence: late positions are where long context is used


def slice_name(task: int, difficulty: int) -> str:
    """recall: pairs in octaves (pairs4-7); counting and votes: the alphabet size itself."""
    if TASKS[task] != "recall":
        return f"{TASKS[task]}/alphabet{difficulty}"
    low = 1 << (difficulty.bit_length() - 1)
    return f"recall/pairs{low}-{2 * low - 1}"


class EvalSlices:
    """Sums and counts by slice over one evaluation epoch -> means."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] += total
        self.counts[name] += count

    def add_grouped(self, prefix: str, values: torch.Tensor, groups: list[str], counts: torch.Tensor | None = None):
        """values [N] (sums when counts [N] is given, else one observation each) by group name [N]."""
        counts = torch.ones_like(values) if counts is None else counts
        for name, total, count in zip(groups, values.tolist(), counts.tolist()):
            self.add(f"{prefix}/{name}", total, count)

    def update(self, batch: dict, losses: torch.Tensor, correct: torch.Tensor, scored: torch.Tensor) -> None:
        """losses, correct [N] at the scored positions [B, L] of a batch."""
        b, t = scored.nonzero(as_tuple=True)
        bucket = (t * POSITION_BUCKETS // scored.shape[1]).tolist()
        self.add_grouped("loss", losses, [f"pos{q}" for q in bucket])
        self.add_grouped("acc", correct, [f"pos{q}" for q in bucket])
        if "task" in batch:
            names = [slice_name(k, d) for k, d in zip(batch["task"][b].tolist(), batch["difficulty"][b].tolist())]
            self.add_grouped("acc", correct, names)
        if "domain" in batch:
            names = [f"domain_{TEXT_DOMAINS[d]}" for d in batch["domain"][b].tolist()]
            self.add_grouped("loss", losses, names)

    def update_needed_recall(self, batch: dict, selections: list[torch.Tensor], scored: torch.Tensor) -> None:
        """selections: each sparse layer's attended positions [B, L, L] (bool)."""
        need = needed_mask(batch["need_id"], scored)
        total = need.sum((1, 2)).float()
        names = [slice_name(k, d) for k, d in zip(batch["task"].tolist(), batch["difficulty"].tolist())]
        for i, selected in enumerate(selections):
            hits = (need & selected).sum((1, 2)).float()
            self.add("needed_recall", float(hits.sum()), float(total.sum()))
            self.add(f"needed_recall/layer{i}", float(hits.sum()), float(total.sum()))
            self.add_grouped("needed_recall", hits, names, counts=total)

    def compute(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in sorted(self.sums) if self.counts[name]}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
