"""DeepSeek Sparse Attention layer: indexer -> budget -> causal top-k -> sparse attention op.

Lives inside an MLA layer and receives its absorbed queries and shared latent rows. The indexer reads a
detached copy of the hidden state, so the LM loss trains the model and the indexer KL trains the
indexer. Until `sparse_active` is switched on (after `warmup_steps`, by the training module), it only
trains the indexer on full causal rows and the layer attends densely.

A budget that returns a differentiable k (the adaptive controller) is trained by the LM loss through a
soft rank mask on the selected logits: slot j (the j-th best selected position) gets the logit bias
b_j = log sigmoid((k - j - 1/2) / tau) - stop_grad(log sigmoid(...)), exactly 0 in the forward pass (so
the computation is the hard top-k) while its gradient tells k how much the boundary positions matter.
Masking logits, not weights, keeps the softmax normalised over what remains, as a smaller hard top-k
would; and its gradient is the logits' own, which the attention backward computes anyway.
"""

import math

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
        resolve_backend(backend, torch.device("cpu"), block_size, query_block)
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

    def slots(self, k):
        """k in tokens (int or tensor) -> score columns to select: tokens, or past key blocks."""
        return k if self.token_level else self.past_blocks(k)

    def select(self, x: torch.Tensor, scores: torch.Tensor, k) -> torch.Tensor:
        """Top-k (k in tokens: int, [B] or [B, R]) over the eligible columns of each score row; the
        query's own token is always kept (block mode attends its diagonal blocks anyway)."""
        _, n_eligible = self.rows(x.shape[1], x.device)
        return self.selector(scores, self.slots(k), n_eligible, include_last=self.token_level)

    def hard_k(self, k, seq_len: int):
        """Budget (float tokens, tensor or int) -> the k spent: whole tokens, or in block mode whole
        blocks (the diagonal plus past blocks)."""
        k_hard = k.detach().float().ceil().long().clamp(1, seq_len) if torch.is_tensor(k) else min(k, seq_len)
        if self.token_level:
            return k_hard
        k_hard = self.diagonal_tokens + self.past_blocks(k_hard) * self.block_size
        return k_hard if torch.is_tensor(k) else int(k_hard)

    def attended_pairs(self, used: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Slots in use per score row [..., R] -> attended causal (query, key) pairs [...]"""
        if self.token_level:
            return used.sum(-1).double()
        n_qb, _, _ = block_layout(seq_len, self.block_size, self.query_block)
        queries = torch.clamp(seq_len - torch.arange(n_qb, device=used.device) * self.query_block, max=self.query_block)
        diag = (queries * (queries + 1) / 2).sum()  # causal pairs inside each query block
        return (used * self.block_size * queries).sum(-1).double() + diag

    def fixed_budget_pairs(self, keep: float, seq_len: int, device) -> torch.Tensor:
        """Causal (query, key) pairs a fixed budget `keep` attends in a sequence of `seq_len`."""
        k = self.hard_k(max(1, math.ceil(keep * seq_len)), seq_len)
        _, n_eligible = self.rows(seq_len, device)
        return self.attended_pairs(n_eligible.clamp(max=int(self.slots(k))), seq_len)

    def rank_bias(self, k_soft: torch.Tensor, n_slots: int) -> torch.Tensor:
        """k_soft [B, R] (tokens, differentiable) -> logit bias [B, R, n_slots], exactly 0 in the forward pass."""
        units = k_soft if self.token_level else (k_soft - self.diagonal_tokens) / self.block_size  # in columns
        slot_middle = torch.arange(n_slots, device=k_soft.device, dtype=k_soft.dtype) + 0.5
        tau = self.soft_rank_tau * units.detach().clamp_min(1)[..., None]
        soft = torch.nn.functional.logsigmoid((units[..., None] - slot_middle) / tau)
        return soft - soft.detach()

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
            dense = torch.ones(())
            self.last_stats = {"indexer_kl": kl.detach(), "keep_ratio": dense, "keep_mean": dense}
            return None, {"indexer_kl": kl}

        positions, n_eligible = self.rows(L, x.device)
        k = self.budget(
            x,
            scores,
            positions=positions,
            n_eligible=n_eligible,
            block_size=self.block_size,
            diagonal_tokens=self.diagonal_tokens,
        )
        k_hard = self.hard_k(k, L)
        indices = self.select(x, scores, k_hard)
        bias = self.rank_bias(k, indices.shape[-1]) if torch.is_tensor(k) and k.requires_grad else None
        out, slot_probs = sparse_attention(
            q, kv, indices, scale=scale, v_dim=v_dim, backend=self.backend, slot_bias=bias, **layout
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
        """keep_mean: the keep of the fixed budget that would attend as many causal (query, key) pairs
        (a fixed budget's own keep; adaptive budgets hold it at their target, so that they spend the
        compute of the fixed budget at that keep); keep_ratio: attended causal pairs / all causal pairs;
        k (tokens) per sequence, mean over its rows. Mean k / L is not the measure of compute: a query
        cannot attend more positions than precede it, so a budget that gives early queries less and
        late ones more attends more pairs than a fixed k of the same mean."""
        B = indices.shape[0]
        attended = self.attended_pairs((indices >= 0).sum(-1), seq_len)  # [B]
        target = self.budget.target
        fixed = self.fixed_budget_pairs(target, seq_len, indices.device)
        k = torch.as_tensor(k, dtype=torch.float64, device=indices.device)
        k_seq = (k.reshape(B, -1) if k.dim() else k.expand(B, 1)).mean(-1)
        return {
            "keep_ratio": (attended / (seq_len * (seq_len + 1) / 2)).mean(),
            "keep_mean": target * attended.mean() / fixed,
            "k_mean": k_seq.mean(),
            "k_per_sequence": k_seq.float(),
            "k_values": k.float().flatten() if k.dim() else k.float().reshape(1),
        }

    def after_step(self) -> None:
        """After a training step in the sparse stage: let the budget adjust to its target."""
        if bool(self.sparse_active) and "keep_mean" in self.last_stats:
            self.budget.after_step(float(self.last_stats["keep_mean"]))
