"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values come from one shared latent `c_kv = W_DKV h` ([B, L, d_c]) plus a decoupled RoPE key
`k_rope` ([B, L, d_r]) shared by all heads; per-head up-projections W_UK [H, d_h, d_c] and
W_UV [H, d_v, d_c] expand the latent.

Two equivalent ways to attend:
- *expanded*: materialise per-head K/V and call causal SDPA (the dense model's path);
- *absorbed* ("MQA mode", DeepSeek-V3.2): fold W_UK into the query, so every head scores the same
  latents `[c_kv ; k_rope]` ([B, L, d_c + d_r], one row per token); the weighted sum stays in latent
  space and W_UV is applied afterwards. Sparse attention gathers each query's selected latent rows once
  for all heads.
"""

import torch
import torch.nn.functional as F
from torch import nn

from adaptive_attn.nn.component import component
from adaptive_attn.nn.norm import RMSNorm
from adaptive_attn.nn.rope import apply_rope


class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int = 32,
        rope_dim: int = 16,
        v_head_dim: int = 32,
        kv_rank: int = 64,
        q_rank: int = 0,
        dsa: nn.Module | None = None,
    ):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.v_head_dim = n_heads, head_dim, rope_dim, v_head_dim
        self.kv_rank = kv_rank
        qk_dim = head_dim + rope_dim
        if q_rank > 0:
            self.q_proj = nn.Sequential(
                nn.Linear(d_model, q_rank, bias=False), RMSNorm(q_rank), nn.Linear(q_rank, n_heads * qk_dim, bias=False)
            )
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        self.kv_down = nn.Linear(d_model, kv_rank + rope_dim, bias=False)
        self.kv_norm = RMSNorm(kv_rank)
        self.w_uk = nn.Parameter(torch.randn(n_heads, head_dim, kv_rank) * kv_rank**-0.5)
        self.w_uv = nn.Parameter(torch.randn(n_heads, v_head_dim, kv_rank) * kv_rank**-0.5)
        self.out = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.scale = qk_dim**-0.5
        self.dsa = dsa

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, L, D] -> q_nope [B,H,L,d_h], q_rope [B,H,L,d_r], c_kv [B,L,d_c], k_rope [B,L,d_r]"""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.head_dim, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin), self.kv_norm(c_kv), apply_rope(k_rope, cos, sin)

    def expanded_attention(self, q_nope, q_rope, c_kv, k_rope) -> torch.Tensor:
        """Dense causal attention over per-head K/V -> [B, H, L, d_v]"""
        k_nope = torch.einsum("blc,hdc->bhld", c_kv, self.w_uk)
        v = torch.einsum("blc,hvc->bhlv", c_kv, self.w_uv)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
        # SDPA's fused CPU/GPU kernels need equal q/k/v head dims (else a ~10x slower math path)
        pad = q.shape[-1] - v.shape[-1]
        v = F.pad(v, (0, pad)) if pad > 0 else v
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return o[..., : self.v_head_dim]

    def absorb(self, q_nope, q_rope, c_kv, k_rope) -> tuple[torch.Tensor, torch.Tensor]:
        """-> query in latent space [B, H, L, d_c + d_r], latents shared by all heads [B, L, d_c + d_r]

        The query is stored [B, L, H, ·] (returned transposed): block-sparse attention then hands each
        query block's rows of all heads to one SDPA call without a copy."""
        q_latent = torch.einsum("bhld,hdc->blhc", q_nope, self.w_uk)
        q_abs = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1).transpose(1, 2)
        return q_abs, torch.cat([c_kv, k_rope], dim=-1)

    def absorbed_attention(self, q_abs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Dense causal MQA over the shared latents -> latent output [B, H, L, d_c]"""
        kv = latents.unsqueeze(1)
        o = F.scaled_dot_product_attention(q_abs, kv, kv, is_causal=True, scale=self.scale, enable_gqa=True)
        return o[..., : self.kv_rank]

    def up_project(self, o_latent: torch.Tensor) -> torch.Tensor:
        """[B, H, L, d_c] -> [B, H, L, d_v]"""
        return torch.einsum("bhlc,hvc->bhlv", o_latent, self.w_uv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x: [B, L, D] -> (y [B, L, D], aux: the DSA layer's indexer loss and statistics, if sparse)"""
        B, L, _ = x.shape
        q_nope, q_rope, c_kv, k_rope = self.project(x, cos, sin)
        aux: dict = {}
        if self.dsa is None:
            with component("dense_attention"):
                o = self.expanded_attention(q_nope, q_rope, c_kv, k_rope)
        else:
            with component("sparse_attention"):  # MQA mode's own work: W_UK into the query, W_UV after
                q_abs, latents = self.absorb(q_nope, q_rope, c_kv, k_rope)
            o_latent, aux = self.dsa(x, q_abs, latents, scale=self.scale, v_dim=self.kv_rank)
            if o_latent is None:  # dense warm-up stage: the indexer trains, attention stays dense
                with component("dense_attention"):
                    o = self.expanded_attention(q_nope, q_rope, c_kv, k_rope)
            else:
                with component("sparse_attention"):
                    o = self.up_project(o_latent)
        return self.out(o.transpose(1, 2).reshape(B, L, -1)), aux
