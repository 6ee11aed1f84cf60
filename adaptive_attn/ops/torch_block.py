"""The torch block backend: the selected key blocks are gathered and fed to fused SDPA, whose flash
backward is reused, so compute follows k.

All heads of a query block attend the same gathered blocks, so its Q queries of H heads go to SDPA as
one head of Q * H rows (one large product instead of H small ones; no copy when q is laid out
[B, L, H, D] in memory, as MLA's absorbed queries are). Four things keep the work close to the
selection's own:
- sequences whose selections use widely different numbers of blocks go one by one (`sequence_groups`);
- consecutive query blocks of one slot width share one SDPA call, cut at that width (`query_block_groups`,
  `slot_width`: a block's own count rounded up by at most 1/8), within a size that keeps calls large but
  masks small;
- the leading query blocks that selected every block before them take one causal SDPA over their
  prefix (`whole_past_query_blocks`): no gather, no mask, only the causal half computed;
- inputs are cut with `split`, whose backward is one concatenation, rather than sliced per call,
  whose backward writes a full-size zero gradient each time.
A slot bias rides in one extra dimension (query 1, key bias / scale), so SDPA adds it to the logits
and returns its gradient through the keys'; only the query blocks marked `biased_rows` pay for it.
"""

import torch
import torch.nn.functional as F

from adaptive_attn.ops.layout import SparseLayout


def split(x: torch.Tensor, sizes: list[int], dim: int = 0):
    """`x.split(sizes, dim)`, but x itself when there is one part: the backward of a split is a
    concatenation, a full copy even of a single part."""
    return [x] if len(sizes) == 1 else x.split(sizes, dim)


def concat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat(parts, dim)`, but the part itself when there is one (a concatenation copies it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def sequence_groups(used: torch.Tensor, max_padding: float = 1.25) -> list[slice]:
    """Batch the sequences together, or one by one when their budgets differ so much that padding all
    to the largest would cost over `max_padding` times the work of each sequence's own k.
    used: [B, R] slots in use per row."""
    B = used.shape[0]
    used = used.float()
    padded = B * used.amax(0).sum()
    return [slice(b, b + 1) for b in range(B)] if B > 1 and padded > max_padding * used.sum() else [slice(0, B)]


def whole_past_query_blocks(used: torch.Tensor, layout: SparseLayout) -> int:
    """Leading query blocks whose selection, in every row of used [B, nQB], holds every key block before
    them (their selection is then their whole causal prefix; the first always qualifies)."""
    return int((used == layout.n_eligible).all(0).long().cumprod(0).sum())


def slot_width(n: int) -> int:
    """The slots a query block using n gathers: n rounded up to a multiple of 2^(floor(log2 n) - 3), at most
    1/8 more. A function of the block's own count, so its arithmetic (and every bit of its output) never
    depends on the other blocks' budgets, while budgets that vary a little share a width."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def query_block_groups(used: torch.Tensor, max_blocks: int, biased: list[bool]) -> list[tuple[int, int, int, bool]]:
    """Consecutive query blocks sharing one slot width and one `biased` flag, attended in one call ->
    [(qb0, qb1, slots, biased)], at most `max_blocks` blocks each. used: [nQB] slots in use (valid slots
    come first); the slots between a block's count and its width are masked."""
    groups: list[tuple[int, int, int, bool]] = []
    for qb, (n, flag) in enumerate(zip(used.tolist(), biased)):
        width = slot_width(n)
        if groups and groups[-1][2:] == (width, flag) and qb - groups[-1][0] < max_blocks:
            groups[-1] = (groups[-1][0], qb + 1, width, flag)
        else:
            groups.append((qb, qb + 1, width, flag))
    return groups


def torch_block_attention(
    q, latents, indices, layout: SparseLayout, *, scale, v_dim, slot_bias=None, biased_rows=None, max_call=2**26
):
    """q [B, H, L, D], latents [B, L, D], indices [B, nQB, K] -> (out [B, H, L, v_dim], None).
    One SDPA call takes as many query blocks as keep its (query row, key) pairs within `max_call`.
    `biased_rows` [nQB] (bool, with a slot bias) marks the query blocks whose bias carries a gradient;
    the others' bias is zero in value and gradient, so they skip its column (by default every block)."""
    L = q.shape[2]
    q_rows, latents = layout.pad(q.transpose(1, 2), 1), layout.pad(latents, 1)  # [B, Lp, H, D], [B, Lp, D]
    extra = slot_width(indices.shape[-1]) - indices.shape[-1]  # room for every block's width
    indices = F.pad(indices, (0, extra), value=-1)
    slot_bias = None if slot_bias is None else F.pad(slot_bias, (0, extra))
    groups = sequence_groups((indices >= 0).sum(-1))
    sizes = [g.stop - g.start for g in groups]
    biased = [slot_bias is not None] * layout.n_rows if biased_rows is None else biased_rows.tolist()
    outs = [
        attend_sequences(
            q_g, latents_g, indices[g], None if slot_bias is None else slot_bias[g], biased, layout, scale, max_call
        )
        for g, q_g, latents_g in zip(groups, split(q_rows, sizes), split(latents, sizes))
    ]
    return concat(outs)[:, :L, :, :v_dim].transpose(1, 2), None


def attend_sequences(q, latents, indices, slot_bias, biased, layout: SparseLayout, scale, max_call) -> torch.Tensor:
    """Sequences that share their SDPA calls: q [b, Lp, H, D] -> [b, Lp, H, D]"""
    nb, _, H, D = q.shape
    qb, m = layout.query_block, layout.blocks_per_query_block
    used = (indices >= 0).sum(-1)  # [b, nQB]
    n_prefix = min(whole_past_query_blocks(used, layout), (biased + [True]).index(True))
    n_prefix = n_prefix if n_prefix > 1 else 0  # one call instead of one per block, so from two blocks on
    used_max = used.amax(0)
    pairs_per_block = nb * qb * H * (int(used_max.max()) + m) * layout.block_size
    groups = [
        (qb0 + n_prefix, qb1 + n_prefix, slots, flag)
        for qb0, qb1, slots, flag in query_block_groups(
            used_max[n_prefix:], max(1, max_call // pairs_per_block), biased[n_prefix:]
        )
    ]
    q_parts = split(q, [n_prefix * qb] * bool(n_prefix) + [(qb1 - qb0) * qb for qb0, qb1, *_ in groups], dim=1)
    chunks = []
    if n_prefix:
        q_prefix, *q_parts = q_parts
        keys = latents[:, None, : n_prefix * qb].expand(-1, H, -1, -1)
        o = F.scaled_dot_product_attention(q_prefix.transpose(1, 2), keys, keys, is_causal=True, scale=scale)
        chunks.append(o.transpose(1, 2))
    for (qb0, qb1, slots, flag), q_part in zip(groups, q_parts):
        bias = slot_bias[:, qb0:qb1, :slots] if flag else None
        o = gathered_attention(q_part, latents, indices[..., :slots], bias, layout, qb0, qb1, scale)
        chunks.append(o[..., :D] if flag else o)  # a bias column's output is cut off
    return concat(chunks, dim=1)


def gathered_attention(q, latents, indices, slot_bias, layout: SparseLayout, qb0, qb1, scale) -> torch.Tensor:
    """Query blocks [qb0, qb1) over their gathered key blocks: q [b, C * Q, H, D] -> [b, C * Q, H, D (+1)]"""
    nb, _, H, D = q.shape
    shared = bool((indices[:, qb0:qb1] >= 0).all())
    keys, mask = layout.gather_key_blocks(latents, indices, qb0, qb1, shared_mask=shared)
    queries = q.reshape(-1, 1, layout.query_block * H, D)  # one SDPA batch row per query block
    keys = keys.flatten(0, 1)[:, None]
    if slot_bias is not None:
        bias = torch.cat([slot_bias.to(q.dtype), slot_bias.new_zeros(nb, qb1 - qb0, layout.blocks_per_query_block)], -1)
        bias = (bias / scale).repeat_interleave(layout.block_size, -1).view(*keys.shape[:-1], 1)
        queries = torch.cat([queries, queries.new_ones(*queries.shape[:-1], 1)], dim=-1)
        keys = torch.cat([keys, bias.to(keys.dtype)], dim=-1)
    mask = mask.repeat_interleave(H, dim=2).flatten(0, 1)[:, None]  # one row per (query, head)
    # values are the keys (latent rows); the bias column's output is cut off by the caller
    o = F.scaled_dot_product_attention(queries, keys, keys, attn_mask=mask, scale=scale)
    return o.view(nb, (qb1 - qb0) * layout.query_block, H, -1)
