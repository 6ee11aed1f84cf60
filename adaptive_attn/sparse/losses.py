"""Indexer training signal (DSA protocol) and the attention-mass recall diagnostic.

The indexer learns to predict where the main attention puts its mass: the target `p[t, :]` is the main
attention's probabilities summed over heads and L1-normalised (detached), and the loss is
KL(p || softmax(I[t, :])). In the dense warm-up the support is the full causal row; in the sparse stage
it is the selected set only, computed from the gathered rows (cost proportional to k, not L).
Block mode compares distributions over the key blocks before each query block, with the target
summed over that block's queries. Everything runs in query chunks to bound memory.
"""

import torch

from adaptive_attn.ops.sparse_attention import block_layout, gather_blocks, query_blocks, selection_mask


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: under autocast the attention probabilities and indexer scores come in
    bf16, whose rounding alone shifts a small KL visibly (and can make it negative)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(target: torch.Tensor, index_scores: torch.Tensor) -> torch.Tensor:
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
def causal_attention_probs(q: torch.Tensor, kv: torch.Tensor, scale: float, c0: int, c1: int) -> torch.Tensor:
    """Dense causal attention of queries [c0, c1), head-averaged: -> [B, C, S]"""
    scores = torch.einsum("bhcd,bsd->bhcs", q[:, :, c0:c1], kv) * scale
    future = torch.arange(kv.shape[1], device=q.device)[None, :] > torch.arange(c0, c1, device=q.device)[:, None]
    return scores.masked_fill(future, float("-inf")).softmax(-1).mean(1)


def token_kl_dense(q, kv, scores, *, scale, chunk_size=128) -> torch.Tensor:
    """Warm-up KL over full causal rows. scores: indexer I [B, L, L] (-inf in the future)."""
    total, rows = scores.new_zeros(()), 0
    for c0 in range(0, q.shape[2], chunk_size):
        c1 = min(c0 + chunk_size, q.shape[2])
        s, n = _kl(causal_attention_probs(q, kv, scale, c0, c1), scores[:, c0:c1])
        total, rows = total + s, rows + n
    return total / max(rows, 1)


def token_kl_selected(slot_probs: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sparse-stage KL over each query's selected tokens.

    slot_probs [B, L, K]: the main attention's head-averaged probabilities of the selected slots (from
    the attention op); scores: indexer I [B, L, L]; indices [B, L, K].
    """
    s, n = _kl(_normalise(slot_probs), scores.gather(-1, indices.clamp(min=0)))
    return s / max(n, 1)


def block_kl_dense(q, kv, scores, *, scale, block_size, query_block, chunk_size=128) -> torch.Tensor:
    """Warm-up KL over all key blocks before each query block. scores [B, nQB, nKB]."""
    B, _, L, _ = q.shape
    n_qb, m, Lp = block_layout(L, block_size, query_block)
    mass = _wide(scores.new_zeros(B, n_qb, n_qb * m))
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        probs = torch.nn.functional.pad(causal_attention_probs(q, kv, scale, c0, c1), (0, Lp - L))
        per_block = probs.view(B, c1 - c0, -1, block_size).sum(-1)  # [B, C, nKB]
        qb = torch.arange(c0, c1, device=q.device) // query_block
        mass.index_add_(1, qb, per_block.to(mass.dtype))
    past = torch.arange(n_qb * m, device=q.device)[None, :] < (torch.arange(n_qb, device=q.device) * m)[:, None]
    s, n = _kl(_normalise(mass * past), scores)
    return s / max(n, 1)


def block_kl_selected(q, kv, scores, indices, *, scale, block_size, query_block, chunk_size=16) -> torch.Tensor:
    """Sparse-stage KL over each query block's selected past blocks. indices [B, nQB, K]."""
    B, H, L, D = q.shape
    n_qb, _, Lp = block_layout(L, block_size, query_block)
    K = indices.shape[-1]
    if K == 0:
        return scores.new_zeros(())
    q = torch.nn.functional.pad(q, (0, 0, 0, Lp - L))
    kv = torch.nn.functional.pad(kv, (0, 0, 0, Lp - L))
    total, rows = scores.new_zeros(()), 0
    real = (torch.arange(Lp, device=q.device) < L).view(n_qb, query_block)
    for qb0 in range(0, n_qb, chunk_size):
        qb1 = min(qb0 + chunk_size, n_qb)
        with torch.no_grad():
            keys, mask = gather_blocks(kv, indices, block_size=block_size, query_block=query_block, qb0=qb0, qb1=qb1)
            queries = query_blocks(q, query_block)[:, qb0:qb1]  # [B, C, Q, H, D]
            logits = torch.einsum("bcqhd,bcsd->bcqhs", queries, keys) * scale
            logits = logits.masked_fill(~mask[:, :, :, None], float("-inf"))
            probs = logits.softmax(-1).mean(3).flatten(0, 1)  # [B*C, Q, S]
            probs = probs * real[qb0:qb1].repeat(B, 1)[..., None]
            mass = probs.sum(1).view(B, qb1 - qb0, -1, block_size).sum(-1)[..., :K]
            target = _normalise(mass * (indices[:, qb0:qb1] >= 0))
        s, n = _kl(target, scores[:, qb0:qb1].gather(-1, indices[:, qb0:qb1].clamp(min=0)))
        total, rows = total + s, rows + n
    return total / max(rows, 1)


@torch.no_grad()
def attention_mass_recall(q, kv, indices, *, scale, block_size=1, query_block=1, chunk_size=128) -> torch.Tensor:
    """Share of the dense attention mass that falls inside the selected set, averaged over queries."""
    L = q.shape[2]
    mask = selection_mask(indices, L, block_size, query_block)
    recall = []
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        recall.append((causal_attention_probs(q, kv, scale, c0, c1) * mask[:, c0:c1]).sum(-1))
    return torch.cat(recall, dim=1).mean()
