"""Lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, eq. 1).

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])

`q[t, j]` (H_I heads of dim d_I) and the head weights `w[t, j]` are projections of the query token's
hidden state; one key `k[s]` per token (LayerNorm'd, RoPE on its first `rope_dim` dims) is shared by
all indexer heads. Only `s <= t` is ever eligible; future scores are -inf.
"""

import torch
from torch import nn

from adaptive_attn.model.rope import RotaryEmbedding, apply_rope


class LightningIndexer(nn.Module):
    def __init__(self, d_model: int, n_heads: int = 4, head_dim: int = 32, rope_dim: int = 16, chunk_size: int = 256):
        super().__init__()
        if not 0 < rope_dim <= head_dim:
            raise ValueError(f"indexer rope_dim must be in (0, head_dim={head_dim}], got {rope_dim}")
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
        q = self.q_proj(xq).view(B, T, self.n_heads, self.head_dim)
        q_rope = apply_rope(q[..., : self.rope_dim].transpose(1, 2), q_cos, q_sin).transpose(1, 2)
        q = torch.cat([q_rope, q[..., self.rope_dim :]], dim=-1) * self.head_dim**-0.5
        k = self.k_norm(self.k_proj(x))
        k = torch.cat([apply_rope(k[..., : self.rope_dim], cos, sin), k[..., self.rope_dim :]], dim=-1)
        w = self.w_proj(xq) * self.n_heads**-0.5
        return q, w, k

    @staticmethod
    def score(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, T, H_I, d_I], w [B, T, H_I], k [B, S, d_I] -> I [B, T, S]"""
        B, T, H, d = q.shape
        dots = torch.bmm(q.reshape(B, T * H, d), k.transpose(1, 2)).view(B, T, H, -1).relu_()
        return torch.bmm(w.reshape(B * T, 1, H), dots.view(B * T, H, -1)).view(B, T, -1)

    def token_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D] -> I [B, L, L], -inf where s > t. Computed in query chunks to bound memory."""
        q, w, k = self.project(x)
        L = x.shape[1]
        scores = torch.cat(
            [
                self.score(q[:, c : c + self.chunk_size], w[:, c : c + self.chunk_size], k)
                for c in range(0, L, self.chunk_size)
            ],
            dim=1,
        )
        future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(future, float("-inf"))

    def block_scores(self, x: torch.Tensor, block_size: int, query_block: int) -> torch.Tensor:
        """Scores of key blocks for each query block -> [B, nQB, nKB].

        A query block's one selection is scored by its *first* query against mean-pooled keys of the
        blocks that lie wholly before it, so it depends on no position inside or after the block
        (a score averaged over the block's queries would leak later tokens into earlier logits).
        Blocks at or after the query block are -inf; the op always attends the diagonal blocks.
        """
        B, L, _ = x.shape
        n_qb = -(-L // query_block)
        n_kb = n_qb * (query_block // block_size)
        first = torch.arange(n_qb, device=x.device) * query_block
        q, w, k = self.project(x, first)
        k = torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_size - L))
        k_pooled = k.view(B, n_kb, block_size, -1).mean(2)
        scores = self.score(q, w, k_pooled)
        past = torch.arange(n_kb, device=x.device)[None, :] < (first // block_size)[:, None]
        return scores.masked_fill(~past, float("-inf"))
