"""Causal top-k selection over indexer scores."""

import torch
from torch import nn


class TopKTokenSelector(nn.Module):
    """Per query row, the `k` highest-scoring eligible positions; never an ineligible (future) one.

    Row `r` may choose among positions `[0, n_eligible[r])`. For tokens that prefix is `t + 1` and the
    query's own position is always kept (`include_last`); for key blocks it is the blocks wholly before
    the query block. With fewer than `k` eligible positions a row gets all of them and the unused slots
    are -1. `k` is a scalar, per sequence `[B]` or per row `[B, R]`. Valid slots come first.
    """

    def forward(
        self, scores: torch.Tensor, k: int | torch.Tensor, n_eligible: torch.Tensor, include_last: bool = True
    ) -> torch.Tensor:
        """scores [B, R, S], n_eligible [R] -> indices [B, R, K] (int64, -1 = unused), K = max k used"""
        B, R, S = scores.shape
        k = torch.as_tensor(k, device=scores.device)
        if k.dim() == 1:
            k = k[:, None]
        k_eff = torch.minimum(k.expand(B, R), n_eligible[None, :].to(k.dtype))  # [B, R]
        K = int(k_eff.max()) if k_eff.numel() else 0
        if K == 0:
            return torch.full((B, R, 0), -1, dtype=torch.long, device=scores.device)
        pos = torch.arange(S, device=scores.device)
        eligible = pos[None, :] < n_eligible[:, None]  # [R, S]
        masked = scores.detach().masked_fill(~eligible, float("-inf"))
        if include_last:
            last = pos[None, :] == (n_eligible[:, None] - 1)
            masked = masked.masked_fill(last, float("inf"))
        indices = torch.topk(masked, K, dim=-1, sorted=True).indices
        slot = torch.arange(K, device=scores.device)
        valid = (slot[None, None, :] < k_eff[..., None]) & (indices < n_eligible[None, :, None])
        return indices.masked_fill(~valid, -1)
