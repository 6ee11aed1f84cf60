"""Indexer training signal (DSA protocol) and the attention-mass recall diagnostic.

The indexer learns to predict where the main attention puts its mass: the target `p[t, :]` is the main
attention's probabilities summed over heads and L1-normalised (detached), and the loss is
KL(p || softmax(I[t, :])). In the dense warm-up the support is the full causal row; in the sparse stage
it is the selected set only, computed from the gathered rows (cost proportional to k, not L).
Block mode compares distributions over the key blocks before each query block, with the target
summed over that block's queries. Everything runs in query chunks to bound memory.
"""

import math

import torch

from adaptive_attn.ops.layout import SparseLayout


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: under autocast the attention probabilities and indexer scores come in
    bf16, whose rounding alone shifts a small KL visibly (and can make it negative)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(target: torch.Tensor, index_scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Row-wise KL(target || softmax(scores)) over the rows that have support -> (sum, rows)."""
    target, index_scores = _wide(target), _wide(index_scores)
    support = target > 0
    log_q = index_scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    terms = torch.where(support, target * (target.clamp_min(1e-30).log() - log_q), torch.zeros_like(target))
    has_row = support.any(-1)
    return terms.sum(-1)[has_row].sum(), int(has_row.sum())


def _normalise(mass: torch.Tensor) -> torch.Tensor:
    mass = _wide(mass)
    return mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)


@torch.no_grad()
def causal_attention_probs(q: torch.Tensor, latents: torch.Tensor, scale: float, c0: int, c1: int) -> torch.Tensor:
    """Dense causal attention of queries [c0, c1), head-averaged: -> [B, C, S]"""
    return attention_probs_at(q, latents, scale, torch.arange(c0, c1, device=q.device))


@torch.no_grad()
def attention_probs_at(q: torch.Tensor, latents: torch.Tensor, scale: float, positions: torch.Tensor) -> torch.Tensor:
    """Dense causal attention of the queries at `positions` [C], head-averaged: -> [B, C, S]"""
    scores = torch.einsum("bhcd,bsd->bhcs", q[:, :, positions], latents) * scale
    future = torch.arange(latents.shape[1], device=q.device)[None, :] > positions[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1).mean(1)


def kl_dense(q, latents, scores, layout: SparseLayout, *, scale, chunk_size=128) -> torch.Tensor:
    """Warm-up KL over each row's eligible columns. scores: indexer I [B, R, C] (-inf where ineligible)."""
    B, _, L, _ = q.shape
    if layout.token_level:
        total, rows = scores.new_zeros(()), 0
        for c0 in range(0, L, chunk_size):
            c1 = min(c0 + chunk_size, L)
            s, n = _kl(causal_attention_probs(q, latents, scale, c0, c1), scores[:, c0:c1])
            total, rows = total + s, rows + n
        return total / max(rows, 1)
    mass = _wide(scores.new_zeros(B, layout.n_rows, layout.n_columns))
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        probs = layout.pad(causal_attention_probs(q, latents, scale, c0, c1), 2)
        per_block = probs.view(B, c1 - c0, layout.n_columns, layout.block_size).sum(-1)  # [B, C, nKB]
        mass.index_add_(1, torch.arange(c0, c1, device=q.device) // layout.query_block, per_block.to(mass.dtype))
    s, n = _kl(_normalise(mass * layout.eligible), scores)
    return s / max(n, 1)


def kl_selected(q, latents, scores, indices, slot_probs, layout: SparseLayout, *, scale, row_fraction=1.0):
    """Sparse-stage KL over each row's selected columns. indices [B, R, K]; slot_probs [B, L, K]: the
    main attention's head-averaged probabilities of the selected tokens (token mode, from the op).
    Block mode recomputes the target over the gathered blocks, for a random `row_fraction` of the rows
    (see `_block_kl_selected`)."""
    if layout.token_level:
        s, n = _kl(_normalise(slot_probs), scores.gather(-1, indices.clamp(min=0)))
        return s / max(n, 1)
    return _block_kl_selected(q, latents, scores, indices, layout, scale=scale, row_fraction=row_fraction)


def _block_kl_selected(q, latents, scores, indices, layout: SparseLayout, *, scale, row_fraction=1.0):
    """Block mode: the mean KL over the (sequence, query block) rows that selected a block, estimated from
    a uniform draw of m = ceil(row_fraction * C) of the C query blocks that have such rows: the sum over
    the drawn blocks, times C / m, over the count of all such rows. Each block is drawn with probability
    m / C, so the estimate is unbiased; its cost is m blocks' instead of C blocks' attention."""
    supported = (indices >= 0).any(-1)  # [B, R]
    candidates = supported.any(0).nonzero().flatten()
    if len(candidates) == 0:
        return scores.new_zeros(())
    m = max(1, math.ceil(row_fraction * len(candidates)))
    drawn = candidates if m == len(candidates) else candidates[torch.randperm(len(candidates))[:m].sort().values]
    q, latents = layout.pad(q, 2), layout.pad(latents, 1)
    real = (torch.arange(layout.padded_len, device=q.device) < layout.seq_len).view(layout.n_rows, -1)  # not padding
    total = scores.new_zeros(())
    for r in drawn.tolist():
        with torch.no_grad():
            keys, mask = layout.gather_key_blocks(
                latents, indices, r, r + 1, shared_mask=bool((indices[:, r] >= 0).all())
            )
            logits = torch.einsum("bqhd,bsd->bqhs", layout.query_blocks(q)[:, r], keys[:, 0]) * scale
            probs = logits.masked_fill(~mask[:, 0, :, None], float("-inf")).softmax(-1).mean(2)  # [B, Q, S]
            mass = (probs * real[r, None, :, None]).sum(1).view(q.shape[0], -1, layout.block_size).sum(-1)
            target = _normalise(mass[:, : indices.shape[-1]] * (indices[:, r] >= 0))
        s, _ = _kl(target, scores[:, r].gather(-1, indices[:, r].clamp(min=0)))
        total = total + s
    return total * (len(candidates) / m) / int(supported.sum())


@torch.no_grad()
def attention_mass_recall(q, latents, mask: torch.Tensor, *, scale, chunk_size=128) -> torch.Tensor:
    """Share of the dense attention mass that falls inside the attended positions mask [B, L, L], averaged
    over queries."""
    L = q.shape[2]
    recall = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        recall.append((causal_attention_probs(q, latents, scale, c0, c1) * mask[:, c0:c1]).sum(-1))
    return torch.cat(recall, dim=1).mean()
