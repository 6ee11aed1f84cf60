"""Causal top-k selection over indexer scores, in a total order on (score, position)."""

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_attn.ops.layout import SparseLayout


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
    """Per row, the `k` highest-scoring eligible columns of a `SparseLayout`; never an ineligible (future) one.

    Row `r` may choose among columns `[0, n_eligible[r])`. In token mode the query's own position is
    always kept; in block mode the row attends its diagonal blocks anyway. The columns holding the first
    `sink_tokens` positions are always kept where eligible (attention sinks, as StreamingLLM's); like the
    own position, they take slots of k, so they count in the compute as any selected key. With fewer than `k`
    eligible columns a row gets all of them and the unused slots are -1. `k` (whole columns) is a
    scalar, per sequence `[B]` or per row `[B, R]`. Valid slots come first, best first. A row's
    selection and its slot order depend on that row's scores and k alone (see `order_keys`).
    """

    def __init__(self, sink_tokens: int = 0, row_chunk: int = 128):
        super().__init__()
        self.sink_tokens, self.row_chunk = sink_tokens, row_chunk

    def forward(self, scores: torch.Tensor, k: int | torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """scores [B, R, C] -> indices [B, R, K] (int64, -1 = unused), K = the largest k used"""
        B, R, _ = scores.shape
        n_eligible = layout.n_eligible
        k = torch.as_tensor(k, device=scores.device)
        k_eff = torch.minimum(k.reshape(-1, 1) if k.dim() == 1 else k, n_eligible).expand(B, R)  # [B, R]
        K = int(k_eff.max()) if k_eff.numel() else 0
        if K == 0:
            return torch.full((B, R, 0), -1, dtype=torch.long, device=scores.device)
        # token mode, in chunks of rows: a chunk reads only the columns up to its last query (the later ones
        # are future to all of them), so most of the masked upper triangle is never ranked
        step = self.row_chunk if layout.token_level else R
        indices = torch.cat([self.top_columns(scores, r0, min(r0 + step, R), K, layout) for r0 in range(0, R, step)], 1)
        slot = torch.arange(K, device=scores.device)
        valid = (slot[None, None, :] < k_eff[..., None]) & (indices < n_eligible[None, :, None])
        return indices.masked_fill(~valid, -1)

    def top_columns(self, scores: torch.Tensor, r0: int, r1: int, K: int, layout: SparseLayout) -> torch.Tensor:
        """Rows [r0, r1) -> their K best columns in (score, position) order, ineligible ones last: [B, r1 - r0, K]
        (-1 past the columns the chunk reads)."""
        columns = r1 if layout.token_level else layout.n_columns
        eligible = layout.eligible[r0:r1, :columns]
        masked = scores.detach()[:, r0:r1, :columns].masked_fill(~eligible, float("-inf"))
        if self.sink_tokens:  # ties among kept columns go by position: the own one first, then the sinks
            sinks = torch.arange(columns, device=scores.device) < -(-self.sink_tokens // layout.block_size)
            masked = masked.masked_fill(sinks & eligible, float("inf"))
        if layout.token_level:
            own = torch.arange(r0, r1, device=scores.device)
            masked[:, own - r0, own] = float("inf")
        width = min(K, columns)
        indices = torch.topk(order_keys(masked), width, dim=-1, sorted=True).values & 0xFFFFFFFF
        return F.pad(indices, (0, K - width), value=-1)
