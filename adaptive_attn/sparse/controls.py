"""Controls that isolate adaptivity, each held at the compute of its target keep like the adaptive budget.

- `OracleTopP`: per row, the smallest set of columns holding mass p of the *true dense* attention
  (of the row's deciding query, head-averaged; in block mode summed per key block), p steered to the
  target compute. It selects by that attention too: the upper bound of what any adaptive budget
  built on the indexer could gain.
- `ShuffledController`: the adaptive controller's k, permuted among the sequences of the batch for
  each query group (so every row keeps its number of eligible keys, and the batch its compute). Same
  histogram, same compute, random assignment: does *which* sequence gets the budget matter?
"""

import torch

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.sparse.budget import AdaptiveTopP
from adaptive_attn.sparse.controller import DynamicSparsityController
from adaptive_attn.sparse.losses import attention_probs_at


class OracleTopP(AdaptiveTopP):
    """Top-p over the true dense attention; the DSA layer selects by `attention_scores` instead of the indexer."""

    @torch.no_grad()
    def attention_scores(self, q, latents, layout: SparseLayout, scale: float) -> torch.Tensor:
        """-> log of the deciding queries' dense attention per column [B, R, C], -inf where ineligible"""
        rows = layout.row_positions
        probs = torch.cat([attention_probs_at(q, latents, scale, chunk) for chunk in rows.split(128)], dim=1)
        if not layout.token_level:  # mass per key block
            probs = layout.pad(probs, 2).view(*probs.shape[:2], layout.n_columns, layout.block_size).sum(-1)
        return probs.float().log().masked_fill(~layout.eligible, float("-inf"))


class ShuffledController(DynamicSparsityController):
    """The adaptive controller, with each query group's k handed to another sequence of the batch.

    The permutation is fixed per (batch size, group) by a seeded generator, so a forward pass is a
    function of its input (the batch is itself a random draw, so the pairing is random)."""

    def forward(self, x: torch.Tensor, scores: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        k = super().forward(x, scores, layout)  # [B, R]
        group = layout.row_positions // self.query_stride
        generator = torch.Generator().manual_seed(0)
        perms = torch.rand(int(group[-1]) + 1, k.shape[0], generator=generator).argsort(-1).to(k.device)  # [G, B]
        return k.gather(0, perms[group].T)
