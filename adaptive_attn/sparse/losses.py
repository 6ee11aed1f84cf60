"""Indexer training signal (DSA protocol) and the attention-mass recall diagnostic.

The indexer learns to predict where the main attention puts its mass: the target `p[t, :]` is the main
attention's probabilities summed over heads and L1-normalised (detached), and the loss is
KL(p || softmax(I[t, :])). In the dense warm-up the support is the full causal row; in the sparse stage
it is the selected set only, computed from the gathered rows (cost proportional to k, not L).
Block mode compares distributions over the key blocks before each query block, with the target
summed over that block's queries: from the attention op itself where it had room (torch backend), else
recomputed for a drawn share of the query blocks. Everything runs in query chunks to bound memory.
"""

import math

import torch
import torch.nn.functional as F

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.sdpa_block import block_indicator, mass_per_block


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: under autocast the attention probabilities and indexer scores come in
    bf16, whose rounding alone shifts a small KL visibly (and can make it negative)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl_rows(target: torch.Tensor, index_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise KL(target || softmax(scores)) -> (KL per row, 0 where the row has no support; which rows have)."""
    target, index_scores = _wide(target), _wide(index_scores)
    support = target > 0
    log_q = index_scores.masked_fill(~support, float("-inf")).log_softmax(-1)
    terms = torch.where(support, target * (target.clamp_min(1e-30).log() - log_q), torch.zeros_like(target))
    return terms.sum(-1), support.any(-1)


def _kl(target: torch.Tensor, index_scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Row-wise KL(target || softmax(scores)) over the rows that have support -> (sum, rows)."""
    kl, has_row = _kl_rows(target, index_scores)
    return kl[has_row].sum(), int(has_row.sum())


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


def kl_dense_tokens(q, latents, score_chunks: list[torch.Tensor], *, scale) -> torch.Tensor:
    """Warm-up KL over each query's causal row, token mode. score_chunks: the indexer's scores in chunks of
    queries, [B, c1 - c0, c1] for queries [c0, c1) (`LightningIndexer.token_score_chunks`). A chunk reads
    only the keys before c1; a query's later keys have no target mass, so they are outside the KL's support
    whatever their score. Chunk by chunk, no [B, L, L] tensor is made, forward or backward."""
    total, rows, c0 = q.new_zeros(()), 0, 0
    for chunk in score_chunks:
        c1 = c0 + chunk.shape[1]
        s, n = _kl(causal_attention_probs(q, latents[:, :c1], scale, c0, c1), chunk)
        total, rows, c0 = total + s, rows + n, c1
    return total / max(rows, 1)


def kl_dense_blocks(q, latents, scores, layout: SparseLayout, *, scale, chunk_size=128) -> torch.Tensor:
    """Warm-up KL over each query block's eligible key blocks. scores: indexer I [B, R, C] (-inf where
    ineligible); the target, chunk by chunk of queries, each over the keys before its last."""
    B, _, L, _ = q.shape
    mass = _wide(scores.new_zeros(B, layout.n_rows, layout.n_columns))
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        probs = layout.pad(causal_attention_probs(q, latents[:, :c1], scale, c0, c1), 2)
        per_block = probs.view(B, c1 - c0, layout.n_columns, layout.block_size).sum(-1)  # [B, C, nKB]
        mass.index_add_(1, torch.arange(c0, c1, device=q.device) // layout.query_block, per_block.to(mass.dtype))
    s, n = _kl(_normalise(mass * layout.eligible), scores)
    return s / max(n, 1)


def kl_selected(
    q, latents, selected_scores, indices, slot_probs, layout: SparseLayout, *, scale, row_fraction=1.0, generator=None
):
    """Sparse-stage KL over each row's selected columns. selected_scores: the indexer's scores of the selected
    columns [B, R, K] (any value in unused slots); indices [B, R, K]; slot_probs, from the op: token mode, the
    main attention's head-averaged probabilities of the selected tokens [B, L, K]; block mode, each selected
    block's mass [B, R, K] (NaN in rows the op had no room for) or None (see `_block_kl_selected`, which
    draws rows with `generator`)."""
    if layout.token_level:
        s, n = _kl(_normalise(slot_probs), selected_scores)
        return s / max(n, 1)
    args = dict(scale=scale, row_fraction=row_fraction, generator=generator)
    return _block_kl_selected(q, latents, selected_scores, indices, slot_probs, layout, **args)


def draw_rows(
    layout: SparseLayout, fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """Of the C rows (query blocks) that have eligible columns, m = ceil(fraction * C) in a window at a
    uniform random start, wrapping around -> (the drawn rows, ascending; C / m). Each row is drawn with
    probability m / C, so a sum over the drawn rows times C / m is unbiased; a window keeps them contiguous
    (at most two runs), so they take few calls. The draw depends on the geometry alone, never on what
    the rows selected."""
    candidates = (layout.n_eligible > 0).nonzero().flatten()
    C = len(candidates)
    m = max(1, math.ceil(fraction * C))
    if C == 0 or m >= C:
        return candidates, 1.0
    start = int(torch.randint(C, (), generator=generator))
    return candidates[(start + torch.arange(m, device=candidates.device)) % C].sort().values, C / m


def _block_kl_selected(
    q, latents, selected_scores, indices, op_mass, layout: SparseLayout, *, scale, row_fraction=1.0, generator=None
):
    """Block mode: the mean KL over the (sequence, query block) rows that selected a block. Rows whose target
    the op returned (`op_mass`) count exactly; the others are estimated from the query blocks `draw_rows`
    draws (unbiased: their sum times C / m), whose targets come from fused SDPA calls over the contiguous
    runs (`block_mass`). With the op's mass for every row, the KL is exact and nothing is drawn."""
    supported = (indices >= 0).any(-1)  # [B, R]
    if not supported.any():
        return selected_scores.new_zeros(())
    known = torch.zeros_like(supported) if op_mass is None else ~op_mass[..., 0].isnan()
    total = selected_scores.new_zeros(())
    if known.any():
        kl, _ = _kl_rows(_normalise(op_mass.nan_to_num() * (indices >= 0)), selected_scores)
        total = total + kl[known & supported].sum()
    missing = supported & ~known
    if missing.any():
        drawn, weight = draw_rows(layout, row_fraction, generator)
        q, latents = layout.pad(q, 2), layout.pad(latents, 1)
        for run in torch.tensor_split(drawn, (torch.diff(drawn) > 1).nonzero().flatten() + 1):  # contiguous runs
            qb0, qb1 = int(run[0]), int(run[-1]) + 1
            target = _normalise(block_mass(q, latents, indices, layout, qb0, qb1, scale) * (indices[:, qb0:qb1] >= 0))
            kl, _ = _kl_rows(target, selected_scores[:, qb0:qb1])
            total = total + weight * kl[missing[:, qb0:qb1]].sum()
    return total / int(supported.sum())


@torch.no_grad()
def block_mass(q, latents, indices, layout: SparseLayout, qb0: int, qb1: int, scale: float) -> torch.Tensor:
    """The main attention's mass on each selected block of query blocks [qb0, qb1), summed over their real
    queries and averaged over heads -> [B, C, K]. q [B, H, Lp, D], latents [B, Lp, D] (padded).

    SDPA over the gathered blocks with one-hot block indicators as values returns each (query, head)'s
    mass per block: the fused kernel does the softmax and the sum."""
    B, H, Lp, D = q.shape
    C, K, Q = qb1 - qb0, indices.shape[-1], layout.query_block
    selected = indices[:, qb0:qb1].reshape(B * C, K)
    seqs = torch.arange(B, device=q.device).repeat_interleave(C)
    rows = torch.arange(qb0, qb1, device=q.device).repeat(B)
    shared = bool((selected >= 0).all())
    keys, mask = layout.gather_key_blocks(latents, selected, seqs, rows, shared_mask=shared)  # [B * C, S, D]
    S = keys.shape[1]
    width = max(D, S // layout.block_size)  # as wide as the keys where it can: SDPA then takes its fused kernel
    values = block_indicator(S, layout.block_size, width, q).expand(B * C, 1, S, width)
    queries = layout.query_blocks(q)[:, qb0:qb1].reshape(B * C, 1, Q * H, D)
    mask = mask.repeat_interleave(H, dim=1)[:, None]
    out = F.scaled_dot_product_attention(queries, keys[:, None], values, attn_mask=mask, scale=scale)
    return _wide(mass_per_block(out.view(B * C, Q, H, width), 0, K, layout.real_queries(rows)).view(B, C, K))


@torch.no_grad()
def attention_mass_recall(q, latents, masks: list[torch.Tensor], *, scale, chunk_size=128) -> list[torch.Tensor]:
    """Share of the dense attention mass that falls inside each mask of attended positions [B, L, L], averaged
    over queries -> one per mask. Chunk by chunk of queries, the probabilities are computed once for every
    mask, over the keys up to the chunk's last query (the later ones hold no mass)."""
    B, _, L, _ = q.shape
    totals = [0.0] * len(masks)
    for c0 in range(0, L, chunk_size):
        c1 = min(c0 + chunk_size, L)
        probs = causal_attention_probs(q, latents[:, :c1], scale, c0, c1)  # [B, c1 - c0, c1]
        totals = [total + (probs * mask[:, c0:c1, :c1]).sum() for total, mask in zip(totals, masks)]
    return [total / (B * L) for total in totals]
