"""Lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, eq. 1).

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])

`q[t, j]` (H_I heads of dim d_I) and the head weights `w[t, j]` are projections of the query token's
hidden state; one key `k[s]` per token (LayerNorm'd, RoPE on its first `rope_dim` dims) is shared by
all indexer heads. Only `s <= t` is ever eligible; future scores are -inf. In block mode a query
block's one row is scored by its first query against the mean-pooled keys of whole blocks.
"""

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_attn.nn.rope import RotaryEmbedding, apply_rope
from adaptive_attn.ops.layout import SparseLayout


def check_rope_dim(rope_dim: int, head_dim: int) -> None:
    """The indexer's RoPE rule; ValueError naming the key."""
    if not (isinstance(rope_dim, int) and 2 <= rope_dim <= head_dim and rope_dim % 2 == 0):
        raise ValueError(
            f"model.sparse.indexer.rope_dim={rope_dim!r} is invalid: must be an even integer in "
            f"[2, model.sparse.indexer.head_dim={head_dim}]"
        )


class LightningIndexer(nn.Module):
    def __init__(self, d_model: int, n_heads: int = 4, head_dim: int = 32, rope_dim: int = 16, chunk_size: int = 128):
        super().__init__()
        check_rope_dim(rope_dim, head_dim)
        self.n_heads, self.head_dim, self.rope_dim, self.chunk_size = n_heads, head_dim, rope_dim, chunk_size
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.w_proj = nn.Linear(d_model, n_heads, bias=False)
        self.k_proj = nn.Linear(d_model, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.rope = RotaryEmbedding(rope_dim)

    def project(self, x: torch.Tensor, query_positions: torch.Tensor | None = None):
        """x: [B, L, D] -> q [B, T, H_I, d_I] (pre-scaled), w [B, T, H_I], k [B, L, d_I].

        Queries are projected at `query_positions` only (all L positions by default).
        """
        B, L, _ = x.shape
        cos, sin = self.rope(L, x.dtype)
        xq, q_cos, q_sin = x, cos, sin
        if query_positions is not None:
            xq, q_cos, q_sin = x[:, query_positions], cos[query_positions], sin[query_positions]
        T = xq.shape[1]
        # split, not slices: a slice's backward writes a full-size zero gradient, a split's is one concatenation
        parts = [self.rope_dim, self.head_dim - self.rope_dim]
        q_rope, q_rest = self.q_proj(xq).view(B, T, self.n_heads, self.head_dim).split(parts, dim=-1)
        q_rope = apply_rope(q_rope.transpose(1, 2), q_cos, q_sin).transpose(1, 2)
        q = torch.cat([q_rope, q_rest], dim=-1) * self.head_dim**-0.5
        k_rope, k_rest = self.k_norm(self.k_proj(x)).split(parts, dim=-1)
        k = torch.cat([apply_rope(k_rope, cos, sin), k_rest], dim=-1)
        w = self.w_proj(xq) * self.n_heads**-0.5
        return q, w, k

    @staticmethod
    def score(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, T, H_I, d_I], w [B, T, H_I], k [B, S, d_I] -> I [B, T, S]"""
        B, T, H, d = q.shape
        # ReLU in place on the product itself: on a view of it, autograd would copy the whole tensor back
        dots = torch.bmm(q.reshape(B, T * H, d), k.transpose(1, 2)).relu_().view(B, T, H, -1)
        # the weighted sum over heads as a product and a sum: as a batched matmul it is B * T products of
        # [1, H] x [H, S], which run 2-3x slower forward and backward on a CPU
        return (dots * w[..., None]).sum(2)

    def forward(self, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """x: [B, L, D] -> scores I [B, R, C] over the layout's rows and columns, -inf where ineligible."""
        if layout.token_level:
            return self.join_chunks(self.token_score_chunks(x), layout)
        return self.block_scores(x, layout).masked_fill(~layout.eligible, float("-inf"))

    @staticmethod
    def join_chunks(chunks: list[torch.Tensor], layout: SparseLayout) -> torch.Tensor:
        """The chunks of `token_score_chunks` -> I [B, L, L], -inf where ineligible (the future)."""
        L = layout.seq_len
        joined = torch.cat([F.pad(chunk, (0, L - chunk.shape[-1]), value=float("-inf")) for chunk in chunks], 1)
        return joined.masked_fill(~layout.eligible, float("-inf"))

    def token_score_chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [B, L, D] -> I in chunks of `chunk_size` queries, to bound memory: chunk [c0, c1) is [B, c1 - c0, c1].
        A chunk scores only the keys up to its last query (the later ones are future to all its queries), so
        most of the causal upper triangle is never computed; inside the chunk, a query's later keys are
        scored but not masked."""
        q, w, k = self.project(x)
        chunks, end = [], 0
        for q_chunk, w_chunk in zip(q.split(self.chunk_size, 1), w.split(self.chunk_size, 1)):
            end += q_chunk.shape[1]
            chunks.append(self.score(q_chunk, w_chunk, k[:, :end]))
        return chunks

    def block_scores(self, x: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """Scores of key blocks for each query block -> [B, nQB, nKB].

        A query block's one selection is scored by its *first* query against mean-pooled keys, and only
        blocks wholly before it are eligible, so it depends on no position inside or after the block
        (a score averaged over the block's queries would leak later tokens into earlier logits).
        """
        B = x.shape[0]
        q, w, k = self.project(x, layout.row_positions)
        k_pooled = layout.pad(k, 1).view(B, layout.n_columns, layout.block_size, -1).mean(2)
        return self.score(q, w, k_pooled)
