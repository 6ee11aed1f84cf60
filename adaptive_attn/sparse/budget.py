"""Budget policies: how many keys (`k`, in tokens) each query may attend."""

import math

import torch
from torch import nn


class FixedBudget(nn.Module):
    """One k = ceil(keep * L) for every query of every sequence, as in DSA."""

    def __init__(self, keep: float):
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"model.budget.keep must be in (0, 1], got {keep}")
        self.keep = keep

    def forward(self, x: torch.Tensor, index_scores: torch.Tensor) -> int:
        """x: [B, L, D] -> k (tokens)"""
        return max(1, math.ceil(self.keep * x.shape[1]))
