"""Budget policies: how many keys (`k`, in tokens) each query may attend.

A policy is called as `budget(x, scores, positions=..., n_eligible=..., block_size=..., diagonal_tokens=...)`
with the (detached) hidden states `[B, L, D]`, the indexer scores `[B, R, S]` (one row per query, or per
query block), each row's deciding query position and number of eligible columns `[R]`, the tokens per
score column and the tokens every row attends anyway (a query block's diagonal). It returns `k` in
tokens: an int, or a tensor `[B, R]`.
`target` is the keep whose compute it spends: after each training step `after_step(keep)` (the fixed
keep that would have attended as many query-key pairs) lets it adjust to it. `stats()` names what the
SparsityStats callback logs. The adaptive controller lives in `controller.py`.
"""

import math

import torch
from torch import nn


class FixedBudget(nn.Module):
    """One k = ceil(keep * L) for every query of every sequence, as in DSA."""

    def __init__(self, keep: float):
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"model.keep must be in (0, 1], got {keep}")
        self.keep = keep

    @property
    def target(self) -> float:
        return self.keep

    def forward(self, x: torch.Tensor, scores: torch.Tensor, **_) -> int:
        return max(1, math.ceil(self.keep * x.shape[1]))

    def after_step(self, realised_keep: float) -> None:
        pass

    def stats(self) -> dict[str, torch.Tensor]:
        return {}


class AdaptiveTopP(nn.Module):
    """Per query, the smallest set of positions holding probability mass `p` of the indexer's softmax
    (Twilight-style). `p` follows the budget by dual ascent: lowered while the selection spends more
    than a fixed keep = `target` would, raised while less."""

    def __init__(self, target: float = 0.25, p_init: float = 0.5, lr: float = 0.5):
        super().__init__()
        if not 0 < target < 1:
            raise ValueError(f"model.budget.target must be in (0, 1), got {target}")
        self.target, self.lr = target, lr
        self.register_buffer("p", torch.tensor(p_init))

    @torch.no_grad()
    def forward(self, x, scores, *, block_size: int = 1, diagonal_tokens: int = 0, **_) -> torch.Tensor:
        probs = scores.float().softmax(-1).nan_to_num(0.0)  # rows without eligible columns -> all zero
        sorted_probs = probs.sort(-1, descending=True).values
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the higher-ranked columns
        count = ((before < self.p) & (sorted_probs > 0)).sum(-1)  # [B, R]
        return count * block_size + diagonal_tokens

    @torch.no_grad()
    def after_step(self, realised_keep: float) -> None:
        self.p.add_(-self.lr * (realised_keep - self.target)).clamp_(1e-3, 1.0)

    def stats(self) -> dict[str, torch.Tensor]:
        return {"top_p": self.p.clone(), "target": torch.tensor(self.target)}
