"""Causal top-k selection over indexer scores, in a total order on (score, position)."""

import torch
from torch import nn


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """scores [..., S] -> int64 keys [..., S], all distinct within a row, ordered by (score, position).

    The high word holds the float32 score's bits mapped to a signed integer of the same order, the low
    word the position, so equal scores (exact zeros are common after the indexer's ReLU) rank the more
    recent position first. Top-k over these keys picks one set whatever K is: `torch.topk` breaks ties
    among equal floats differently for different K, and K is the batch's largest k, which later rows set.
    """
    bits = (scores.detach().float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    words = torch.empty(*scores.shape, 2, dtype=torch.int32, device=scores.device)
    words[..., 1] = bits  # high word (little-endian int64)
    words[..., 0] = torch.arange(scores.shape[-1], dtype=torch.int32, device=scores.device)
    return words.view(torch.int64).squeeze(-1)


class TopKTokenSelector(nn.Module):
    """Per query row, the `k` highest-scoring eligible positions; never an ineligible (future) one.

    Row `r` may choose among positions `[0, n_eligible[r])`. For tokens that prefix is `t + 1` and the
    query's own position is always kept (`include_last`); for key blocks it is the blocks wholly before
    the query block. With fewer than `k` eligible positions a row gets all of them and the unused slots
    are -1. `k` is a scalar, per sequence `[B]` or per row `[B, R]`. Valid slots come first, best first.
    A row's selection and its slot order depend on that row's scores and k alone (see `order_keys`).
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
        indices = torch.topk(order_keys(masked), K, dim=-1, sorted=True).values & 0xFFFFFFFF
        slot = torch.arange(K, device=scores.device)
        valid = (slot[None, None, :] < k_eff[..., None]) & (indices < n_eligible[None, :, None])
        return indices.masked_fill(~valid, -1)
