"""DeepSeek Sparse Attention layer: indexer -> budget -> causal top-k -> sparse attention op.

Lives inside an MLA layer and receives its absorbed queries and shared latent rows. The indexer reads a
detached copy of the hidden state, so the LM loss trains the model and the indexer KL trains the
indexer. Until `sparse_active` is switched on (after `warmup_steps`, by the training module), it only
trains the indexer on full causal rows and the layer attends densely.

A budget that returns a differentiable k (the adaptive controller) is trained by the LM loss through a
soft rank gate: slot j (the j-th best selected position) is weighted by
g_j = 1 + sigmoid((k - j - 1/2) / tau) - stop_grad(sigmoid(...)), exactly 1 in the forward pass (so the
computation is the hard top-k) while its gradient tells k how much the boundary positions matter.
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
        soft_rank_tau: float = 0.1,
    ):
        super().__init__()
        query_block = query_block or block_size
        if block_size < 1 or query_block % block_size:
            raise ValueError(
                f"model.sparse.query_block ({query_block}) must be a positive multiple of block_size ({block_size})"
            )
        resolve_backend(backend, torch.device("cpu"), block_size)
        self.indexer, self.budget, self.selector = indexer, budget, TopKTokenSelector()
        self.block_size, self.query_block, self.backend = block_size, query_block, backend
        self.warmup_steps, self.soft_rank_tau = warmup_steps, soft_rank_tau
        self.register_buffer("sparse_active", torch.tensor(warmup_steps == 0))
        self.track_recall = False  # set by the SparsityStats callback; costs one dense attention pass
        self.last_stats: dict[str, torch.Tensor] = {}

    @property
    def token_level(self) -> bool:
        return self.block_size == 1

    def index_scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_level:
            return self.indexer.token_scores(x)
        return self.indexer.block_scores(x, self.block_size, self.query_block)

    @property
    def diagonal_tokens(self) -> int:
        """Tokens every score row attends anyway: a query block's own diagonal blocks (none for tokens)."""
        return 0 if self.token_level else self.query_block

    def rows(self, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (deciding query position [R], eligible columns [R]) of the score rows"""
        if self.token_level:
            pos = torch.arange(seq_len, device=device)
            return pos, pos + 1
        n_qb, m, _ = block_layout(seq_len, self.block_size, self.query_block)
        return torch.arange(n_qb, device=device) * self.query_block, torch.arange(n_qb, device=device) * m

    def past_blocks(self, k):
        """k in tokens (int or tensor) -> key blocks to select before the diagonal ones (block mode)."""
        return ((torch.as_tensor(k) - self.diagonal_tokens + self.block_size - 1) // self.block_size).clamp(min=0)

    def select(self, x: torch.Tensor, scores: torch.Tensor, k) -> torch.Tensor:
        """Top-k (k in tokens: int, [B] or [B, R]) over the eligible columns of each score row."""
        _, n_eligible = self.rows(x.shape[1], x.device)
        if self.token_level:
            return self.selector(scores, k, n_eligible, include_last=True)
        return self.selector(scores, self.past_blocks(k).to(x.device), n_eligible, include_last=False)

    def rank_gate(self, k_soft: torch.Tensor, n_slots: int) -> torch.Tensor:
        """k_soft [B, R] (tokens, differentiable) -> gate [B, R, n_slots], exactly 1 in the forward pass."""
        units = (k_soft - self.diagonal_tokens) / self.block_size  # the k of the slots, in score columns
        slot = torch.arange(n_slots, device=k_soft.device, dtype=k_soft.dtype)
        tau = self.soft_rank_tau * units.detach().clamp_min(1)[..., None]
        soft = torch.sigmoid((units[..., None] - slot - 0.5) / tau)
        return 1 + (soft - soft.detach())

    def forward(self, x, q, kv, *, scale: float, v_dim: int):
        """x [B, L, D_model], q [B, H, L, D], kv [B, L, D] -> (out [B, H, L, v_dim] or None, aux)"""
        x = x.detach()
        L = x.shape[1]
        layout = dict(block_size=self.block_size, query_block=self.query_block)
        scores = self.index_scores(x)
        if not bool(self.sparse_active):
            if self.token_level:
                kl = losses.token_kl_dense(q.detach(), kv.detach(), scores, scale=scale)
            else:
                kl = losses.block_kl_dense(q.detach(), kv.detach(), scores, scale=scale, **layout)
            self.last_stats = {"indexer_kl": kl.detach(), "keep_ratio": torch.ones(()), "keep_mean": torch.ones(())}
            return None, {"indexer_kl": kl}

        positions, _ = self.rows(L, x.device)
        k = self.budget(
            x, scores, positions=positions, block_size=self.block_size, diagonal_tokens=self.diagonal_tokens
        )
        k_hard = k.detach().float().ceil().long().clamp(1, L) if torch.is_tensor(k) else min(k, L)
        if not self.token_level:
            # whole blocks are attended: count the budget as such, so that keep_mean (which adaptive
            # budgets hold at their target) measures the compute actually spent
            k_hard = self.diagonal_tokens + self.past_blocks(k_hard) * self.block_size
            k_hard = k_hard if torch.is_tensor(k) else int(k_hard)
        indices = self.select(x, scores, k_hard)
        gate = self.rank_gate(k, indices.shape[-1]) if torch.is_tensor(k) and k.requires_grad else None
        out, slot_probs = sparse_attention(
            q, kv, indices, scale=scale, v_dim=v_dim, backend=self.backend, slot_gate=gate, **layout
        )
        if self.token_level:
            kl = losses.token_kl_selected(slot_probs, scores, indices)
        else:
            kl = losses.block_kl_selected(q.detach(), kv.detach(), scores, indices, scale=scale, **layout)
        self.last_stats = {"indexer_kl": kl.detach(), **self.selection_stats(indices, k_hard, L), **self.budget.stats()}
        if self.track_recall:
            # baseline: the same number of positions per query, chosen at random among the eligible
            random_indices = self.select(x, torch.rand_like(scores), k_hard)
            for name, chosen in (("attn_mass_recall", indices), ("attn_mass_recall_random", random_indices)):
                self.last_stats[name] = losses.attention_mass_recall(
                    q.detach(), kv.detach(), chosen, scale=scale, **layout
                )
        return out, {"indexer_kl": kl}

    @torch.no_grad()
    def selection_stats(self, indices: torch.Tensor, k, seq_len: int) -> dict[str, torch.Tensor]:
        """keep_mean: mean k / L (the budget, as for fixed keep); keep_ratio: attended causal
        (query, key) pairs / all causal pairs; k per sequence (mean over its rows)."""
        B = indices.shape[0]
        causal_pairs = seq_len * (seq_len + 1) / 2
        if self.token_level:
            attended = (indices >= 0).sum((1, 2)).double()
        else:
            n_qb, _, _ = block_layout(seq_len, self.block_size, self.query_block)
            queries = torch.clamp(
                seq_len - torch.arange(n_qb, device=indices.device) * self.query_block, max=self.query_block
            )
            past = (indices >= 0).sum(-1) * self.block_size * queries  # [B, nQB]
            diag = (queries * (queries + 1) / 2).sum()  # causal pairs inside each query block
            attended = past.sum(-1).double() + diag
        k = torch.as_tensor(k, dtype=torch.float64, device=indices.device)
        k_seq = (k.reshape(B, -1) if k.dim() else k.expand(B, 1)).mean(-1)
        return {
            "keep_ratio": (attended / causal_pairs).mean(),
            "keep_mean": k_seq.mean() / seq_len,
            "k_mean": k_seq.mean(),
            "k_per_sequence": k_seq.float(),
            "k_values": k.float().flatten() if k.dim() else k.float().reshape(1),
        }

    def after_step(self) -> None:
        """After a training step in the sparse stage: let the budget adjust to its target."""
        if bool(self.sparse_active) and "keep_mean" in self.last_stats:
            self.budget.after_step(float(self.last_stats["keep_mean"]))
