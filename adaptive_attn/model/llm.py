"""DeepSeek-style MoE language model: token embedding -> N x [RMSNorm, MLA, RMSNorm, DeepSeekMoE] -> RMSNorm -> head.

No absolute position embedding: positions enter through RoPE inside MLA (and the indexer).
Variants differ only in their attention: `DenseMoELLM` (no indexer), `FixedSparseMoELLM` (DSA with a
fixed keep ratio) and `AdaptiveMoELLM` (DSA with an adaptive budget: the `DynamicSparsityController`
or `AdaptiveTopP`).
"""

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch import nn

from adaptive_attn.model.mla import MultiHeadLatentAttention
from adaptive_attn.model.moe import DeepSeekMoE
from adaptive_attn.nn.component import component
from adaptive_attn.nn.conv import ShortConv
from adaptive_attn.nn.norm import RMSNorm
from adaptive_attn.nn.rope import RotaryEmbedding
from adaptive_attn.sparse.budget import FixedBudget
from adaptive_attn.sparse.dsa import DeepSeekSparseAttention
from adaptive_attn.sparse.indexer import LightningIndexer


class Block(nn.Module):
    def __init__(self, d_model: int, attn: MultiHeadLatentAttention, moe: DeepSeekMoE, short_conv: int = 0):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(d_model), attn
        self.conv = ShortConv(d_model, short_conv) if short_conv else nn.Identity()
        self.moe_norm, self.moe = RMSNorm(d_model), moe

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """x: [B, L, D] -> [B, L, D], aux losses"""
        a, aux = self.attn(self.conv(self.attn_norm(x)), cos, sin)
        x = x + a
        with component("moe"):
            m, balance = self.moe(self.moe_norm(x))
        return x + m, {**aux, "balance_loss": balance}


class MoELLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 8,
        head_dim: int | None = None,
        rope_dim: int = 16,
        v_head_dim: int | None = None,
        kv_rank: int = 64,
        q_rank: int = 0,
        rope_base: float = 10000.0,
        moe: dict | None = None,
        sparse: dict | None = None,
        budget: Callable[[], nn.Module] | None = None,
        short_conv: int = 0,
        init_std: float = 0.02,
    ):
        super().__init__()
        head_dim = head_dim or d_model // n_heads
        v_head_dim = v_head_dim or head_dim
        self.embed = nn.Embedding(vocab_size, d_model)
        self.rope = RotaryEmbedding(rope_dim, base=rope_base)
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                MultiHeadLatentAttention(
                    d_model,
                    n_heads,
                    head_dim,
                    rope_dim,
                    v_head_dim,
                    kv_rank,
                    q_rank,
                    dsa=self._build_dsa(d_model, sparse, budget) if budget is not None else None,
                ),
                DeepSeekMoE(d_model, **(moe or {})),
                short_conv,
            )
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.init_std = init_std
        self.apply(self._init_weights)
        for i, dsa in enumerate(self.sparse_layers()):  # each layer draws its own query blocks
            dsa.seed_draws(torch.initial_seed() + i)

    @staticmethod
    def _build_dsa(d_model: int, sparse: dict | None, budget: Callable[[], nn.Module]) -> DeepSeekSparseAttention:
        sparse = dict(sparse or {})
        indexer = LightningIndexer(d_model, **sparse.pop("indexer", {}))
        return DeepSeekSparseAttention(indexer, budget(), **sparse)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.init_std)

    def forward(self, tokens: torch.Tensor, where: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """tokens: [B, L] -> (logits [B, L, V], or [N, V] at the N positions `where` [B, L] marks, aux: summed
        balance loss; with DSA layers also their mean indexer KL and "sparsity", each DSA layer's
        statistics of this call)"""
        x = self.embed(tokens)
        cos, sin = self.rope(tokens.shape[1], x.dtype)
        balance, kls, stats = x.new_zeros(()), [], []
        for block in self.blocks:
            x, aux = block(x, cos, sin)
            balance = balance + aux["balance_loss"]
            if "indexer_kl" in aux:
                kls.append(aux["indexer_kl"])
                stats.append(aux["stats"])
        aux = {"balance_loss": balance}
        if kls:
            aux.update(indexer_kl=torch.stack(kls).mean(), sparsity=stats)
        x = self.norm(x)
        return self.head(x if where is None else x[where]), aux

    def sparse_layers(self) -> Iterator[DeepSeekSparseAttention]:
        return (b.attn.dsa for b in self.blocks if b.attn.dsa is not None)

    def set_sparse_stage(self, active: bool) -> None:
        """Switch every DSA layer to its sparse stage, or back to the dense warm-up (attention dense, the
        indexer trained on whole rows)."""
        for dsa in self.sparse_layers():
            dsa.sparse_active.fill_(active)

    def after_training_step(self, sparsity: list[dict] | None = None) -> None:
        """Non-gradient updates after each optimiser step: MoE router biases, and each sparse budget from
        the compute its layer realised in the step (`sparsity`: the step's aux["sparsity"])."""
        for block in self.blocks:
            block.moe.update_router_bias()
        for dsa, stats in zip(self.sparse_layers(), sparsity or []):
            dsa.update_budget(stats)


class DenseMoELLM(MoELLM):
    """Dense MLA attention everywhere: the baseline. A `sparse` section (an experiment's settings for the
    sparse models of its sweep, such as block sizes) does not apply to it."""

    def __init__(self, vocab_size: int, sparse: dict | None = None, **kwargs):
        super().__init__(vocab_size, sparse=None, budget=None, **kwargs)


class FixedSparseMoELLM(MoELLM):
    """DSA with one k = ceil(keep * L) per sequence (keep 0.1 / 0.25 / 0.5 / 0.75 = fixed10 / 25 / 50 / 75),
    or an absolute `k` tokens at every length."""

    def __init__(self, vocab_size: int, keep: float | None = 0.25, k: int | None = None, sparse=None, **kwargs):
        budget = partial(FixedBudget, None if k is not None else keep, k)
        super().__init__(vocab_size, sparse=sparse, budget=budget, **kwargs)


class AdaptiveMoELLM(MoELLM):
    """DSA whose k adapts within each sequence: `budget` builds one policy per layer (a `_partial_` config of
    `DynamicSparsityController`, `AdaptiveTopP`, or a control: `OracleTopP`, `ShuffledController`), held at
    the compute of a fixed keep (its target)."""

    def __init__(self, vocab_size: int, budget: Callable[[], nn.Module], sparse: dict | None = None, **kwargs):
        super().__init__(vocab_size, sparse=sparse, budget=budget, **kwargs)
