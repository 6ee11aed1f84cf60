"""DeepSeek Sparse Attention layer: indexer -> budget -> causal top-k -> sparse attention op.

Lives inside an MLA layer and receives its absorbed queries and shared latent rows. The indexer reads a
detached copy of the hidden state, so the LM loss trains the model and the indexer KL trains the
indexer. Until `sparse_active` is switched on (after `warmup_steps`, by the training module), it only
trains the indexer on full causal rows and the layer attends densely.
"""

import torch
from torch import nn

from adaptive_attn.ops.sparse_attention import block_layout, resolve_backend, sparse_attention
from adaptive_attn.sparse import losses
from adaptive_attn.sparse.indexer import LightningIndexer
from adaptive_attn.sparse.selector import TopKTokenSelector


class DeepSeekSparseAttention(nn.Module):
    def __init__(
        self,
        indexer: LightningIndexer,
        budget: nn.Module,
        block_size: int = 1,
        query_block: int | None = None,
        backend: str = "auto",
        warmup_steps: int = 0,
    ):
        super().__init__()
        query_block = query_block or block_size
        if block_size < 1 or query_block % block_size:
            raise ValueError(
                f"model.sparse.query_block ({query_block}) must be a positive multiple of block_size ({block_size})"
            )
        resolve_backend(backend, torch.device("cpu"))
        self.indexer, self.budget, self.selector = indexer, budget, TopKTokenSelector()
        self.block_size, self.query_block, self.backend = block_size, query_block, backend
        self.warmup_steps = warmup_steps
        self.register_buffer("sparse_active", torch.tensor(warmup_steps == 0))
        self.track_recall = False  # set by the SparsityStats callback; costs one dense attention pass
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def token_level(self) -> bool:
        return self.block_size == 1

    def select(self, x: torch.Tensor, scores=None, k=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]:
        """x: [B, L, D] (detached) -> (indexer scores, selected indices, k in tokens).

        `scores` and `k` replace the indexer's scores and the budget's k when given.
        """
        L = x.shape[1]
        if self.token_level:
            scores = self.indexer.token_scores(x) if scores is None else scores
            k = self.budget(x, scores) if k is None else k
            n_eligible = torch.arange(1, L + 1, device=x.device)
            return scores, self.selector(scores, k, n_eligible, include_last=True), k
        scores = self.indexer.block_scores(x, self.block_size, self.query_block) if scores is None else scores
        k = self.budget(x, scores) if k is None else k
        n_qb, m, _ = block_layout(L, self.block_size, self.query_block)
        # the diagonal blocks are always attended; the rest of the budget goes to earlier blocks
        past_blocks = (torch.as_tensor(k, device=x.device) + self.block_size - 1) // self.block_size - m
        n_eligible = torch.arange(n_qb, device=x.device) * m
        return scores, self.selector(scores, past_blocks.clamp(min=0), n_eligible, include_last=False), k

    def forward(self, x, q, kv, *, scale: float, v_dim: int):
        """x [B, L, D_model], q [B, H, L, D], kv [B, L, D] -> (out [B, H, L, v_dim] or None, aux)"""
        x = x.detach()
        layout = dict(block_size=self.block_size, query_block=self.query_block)
        if not bool(self.sparse_active):
            scores = self.indexer.token_scores(x) if self.token_level else self.indexer.block_scores(x, **layout)
            if self.token_level:
                kl = losses.token_kl_dense(q.detach(), kv.detach(), scores, scale=scale)
            else:
                kl = losses.block_kl_dense(q.detach(), kv.detach(), scores, scale=scale, **layout)
            self.last_stats = {"indexer_kl": kl.detach(), "keep_ratio": torch.ones(())}
            return None, {"indexer_kl": kl}

        scores, indices, k = self.select(x)
        out, slot_probs = sparse_attention(q, kv, indices, scale=scale, v_dim=v_dim, backend=self.backend, **layout)
        if self.token_level:
            kl = losses.token_kl_selected(slot_probs, scores, indices)
        else:
            kl = losses.block_kl_selected(q.detach(), kv.detach(), scores, indices, scale=scale, **layout)
        self.last_stats = {"indexer_kl": kl.detach(), **self.selection_stats(indices, k, x.shape[1])}
        if self.track_recall:
            # baseline: the same number of positions per query, chosen at random among the eligible
            random_indices = self.select(x, scores=torch.rand_like(scores), k=k)[1]
            for name, chosen in (("attn_mass_recall", indices), ("attn_mass_recall_random", random_indices)):
                self.last_stats[name] = losses.attention_mass_recall(q.detach(), kv.detach(), chosen, scale=scale, **layout)
        return out, {"indexer_kl": kl}

    @torch.no_grad()
    def selection_stats(self, indices: torch.Tensor, k, seq_len: int) -> dict[str, torch.Tensor]:
        """Realised keep ratio = attended causal (query, key) pairs / all causal pairs."""
        causal_pairs = seq_len * (seq_len + 1) / 2
        if self.token_level:
            attended = (indices >= 0).sum((1, 2)).double()
        else:
            n_qb, m, _ = block_layout(seq_len, self.block_size, self.query_block)
            queries = torch.clamp(seq_len - torch.arange(n_qb, device=indices.device) * self.query_block, max=self.query_block)
            past = (indices >= 0).sum(-1) * self.block_size * queries  # [B, nQB]
            diag = (queries * (queries + 1) / 2).sum()  # causal pairs inside each query block
            attended = past.sum(-1).double() + diag
        k = torch.as_tensor(k, dtype=torch.float64).expand(indices.shape[0]) if not torch.is_tensor(k) else k.double()
        return {"keep_ratio": (attended / causal_pairs).mean(), "k_mean": k.float().mean(), "k_per_sequence": k.float()}
