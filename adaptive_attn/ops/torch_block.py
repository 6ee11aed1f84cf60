"""The torch block backend: the selected key blocks are gathered and fed to fused SDPA, whose flash
backward is reused, so compute follows k.

All heads of a query block attend the same gathered blocks. Where every slot of a call is in use, one
mask serves all its query blocks, and a query block's Q queries of H heads go to SDPA as one head of
Q * H rows (one large product instead of H small ones; no copy when q is laid out [B, L, H, D] in
memory, as MLA's absorbed queries are). Where some slots are unused, each query block needs its own
mask: the heads then stay a dimension of SDPA with one shared key head (GQA), so the mask is [Q, S]
per query block, not repeated for each head (a mask H times larger cost as much as the attention).
Four things keep the work close to the selection's own:
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

The values are the latent rows' first `v_dim` columns; the rest of a row (MLA's RoPE key) is no value,
so where a call's key blocks fit in those columns they carry one-hot block indicators, and the output
there is each query's attention mass per key block: the indexer KL's target, at no extra cost.
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
    """q [B, H, L, D], latents [B, L, D], indices [B, nQB, K] -> (out [B, H, L, v_dim], block mass [B, nQB, K]:
    each selected block's attention mass, summed over its query block's queries and averaged over heads;
    NaN in the rows whose call had no room for it, None when no row had).
    One SDPA call takes as many query blocks as keep its (query row, key) pairs within `max_call`.
    `biased_rows` [nQB] (bool, with a slot bias) marks the query blocks whose bias carries a gradient;
    the others' bias is zero in value and gradient, so they skip its column (by default every block)."""
    L, K = q.shape[2], indices.shape[-1]
    q_rows, latents = layout.pad(q.transpose(1, 2), 1), layout.pad(latents, 1)  # [B, Lp, H, D], [B, Lp, D]
    extra = slot_width(K) - K  # room for every block's width
    indices = F.pad(indices, (0, extra), value=-1)
    slot_bias = None if slot_bias is None else F.pad(slot_bias, (0, extra))
    groups = sequence_groups((indices >= 0).sum(-1))
    sizes = [g.stop - g.start for g in groups]
    biased = [slot_bias is not None] * layout.n_rows if biased_rows is None else biased_rows.tolist()
    outs, masses = zip(
        *[
            attend_sequences(
                q_g,
                latents_g,
                indices[g],
                None if slot_bias is None else slot_bias[g],
                biased,
                layout,
                scale,
                v_dim,
                max_call,
            )
            for g, q_g, latents_g in zip(groups, split(q_rows, sizes), split(latents, sizes))
        ]
    )
    mass = concat(list(masses))[..., :K]
    carried = K > 0 and bool((~mass[..., 0].isnan() & (indices[..., 0] >= 0)).any())  # by a row that selected
    return concat(list(outs))[:, :L].transpose(1, 2), mass if carried else None


def attend_sequences(q, latents, indices, slot_bias, biased, layout: SparseLayout, scale, v_dim, max_call):
    """Sequences that share their SDPA calls: q [b, Lp, H, D] -> (out [b, Lp, H, v_dim], block mass [b, nQB, K])"""
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
    chunks, masses = [], []
    if n_prefix:
        q_prefix, *q_parts = q_parts
        o, mass = prefix_attention(q_prefix, latents, indices, layout, n_prefix, scale, v_dim)
        chunks.append(o)
        masses.append(mass)
    for (qb0, qb1, slots, flag), q_part in zip(groups, q_parts):
        bias = slot_bias[:, qb0:qb1, :slots] if flag else None
        o, mass = gathered_attention(q_part, latents, indices[..., :slots], bias, layout, qb0, qb1, scale, v_dim)
        chunks.append(o)
        masses.append(F.pad(mass, (0, indices.shape[-1] - slots)))
    return concat(chunks, dim=1), concat(masses, dim=1)


def indicator_values(keys: torch.Tensor, v_dim: int, n_blocks: int, block_size: int) -> tuple[torch.Tensor, bool]:
    """keys [..., S, W] -> (values, whether they carry block indicators): the keys' first v_dim columns, then
    for each of the n_blocks key blocks a column that is 1 on its rows; the keys themselves when the
    indicators do not fit in the other W - v_dim columns (whose output no one reads)."""
    S, W = keys.shape[-2:]
    if n_blocks > W - v_dim:
        return keys, False
    block_of = torch.arange(S, device=keys.device) // block_size
    indicator = (block_of[:, None] == torch.arange(W - v_dim, device=keys.device)).to(keys.dtype)
    return torch.cat([keys[..., :v_dim], indicator.expand(*keys.shape[:-2], S, W - v_dim)], -1), True


def mass_per_block(o: torch.Tensor, v_dim: int, n_blocks: int, layout: SparseLayout, qb0: int) -> torch.Tensor:
    """Output rows [b, C * Q, H, W] of queries [qb0 * Q, (qb0 + C) * Q) over indicator values -> each key block's
    mass summed over the real (not padding) queries of its query block, averaged over heads: [b, C, n_blocks]"""
    nb, rows, H, _ = o.shape
    C, Q = rows // layout.query_block, layout.query_block
    real = torch.arange(qb0 * Q, qb0 * Q + rows, device=o.device) < layout.seq_len
    mass = o.detach()[..., v_dim : v_dim + n_blocks].mean(2) * real[:, None]
    return mass.view(nb, C, Q, n_blocks).sum(2)


def prefix_attention(q, latents, indices, layout: SparseLayout, n_prefix: int, scale, v_dim):
    """The leading query blocks that selected their whole past: one causal SDPA over their prefix, no gather.
    q [b, P, H, D] -> (out [b, P, H, v_dim], block mass [b, n_prefix, K])"""
    H, P = q.shape[2], q.shape[1]
    keys = latents[:, None, :P].expand(-1, H, -1, -1)
    n_blocks = P // layout.block_size
    values, carries_mass = indicator_values(keys, v_dim, n_blocks, layout.block_size)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, scale=scale).transpose(1, 2)
    selected = indices[:, :n_prefix]
    if not carries_mass:
        return o[..., :v_dim], torch.full(selected.shape, float("nan"), dtype=o.dtype, device=o.device)
    mass = mass_per_block(o, v_dim, n_blocks, layout, 0)  # per key block, in position order
    return o[..., :v_dim], mass.gather(-1, selected.clamp(min=0)) * (selected >= 0)


def gathered_attention(q, latents, indices, slot_bias, layout: SparseLayout, qb0, qb1, scale, v_dim):
    """Query blocks [qb0, qb1) over their gathered key blocks: q [b, C * Q, H, D] -> (out [b, C * Q, H, v_dim],
    block mass [b, C, K] of the K selected slots, NaN if it did not fit)"""
    nb, _, H, D = q.shape
    Q, C = layout.query_block, qb1 - qb0
    shared = bool((indices[:, qb0:qb1] >= 0).all())
    keys, mask = layout.gather_key_blocks(latents, indices, qb0, qb1, shared_mask=shared)
    keys = keys.flatten(0, 1)[:, None]  # [b * C, 1, S, D]: one SDPA batch row per query block
    if shared:  # one mask for all: a query block's Q * H (query, head) rows as one head
        queries, mask = q.reshape(nb * C, 1, Q * H, D), mask.repeat_interleave(H, dim=2)
    else:  # a mask per query block, shared by its H heads (one key head for them), never repeated per head
        queries, mask = q.reshape(nb * C, Q, H, D).transpose(1, 2), mask.flatten(0, 1)[:, None]
    if slot_bias is not None:
        bias = torch.cat([slot_bias.to(q.dtype), slot_bias.new_zeros(nb, C, layout.blocks_per_query_block)], -1)
        bias = (bias / scale).repeat_interleave(layout.block_size, -1).view(*keys.shape[:-1], 1)
        queries = torch.cat([queries, queries.new_ones(*queries.shape[:-1], 1)], dim=-1)
        keys = torch.cat([keys, bias.to(keys.dtype)], dim=-1)
    K = indices.shape[-1]
    values, carries_mass = indicator_values(keys, v_dim, K + layout.blocks_per_query_block, layout.block_size)
    o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=not shared)
    o = o.view(nb, C * Q, H, -1) if shared else o.transpose(1, 2).reshape(nb, C * Q, H, -1)
    if not carries_mass:
        return o[..., :v_dim], o.new_full((nb, C, K), float("nan"))
    return o[..., :v_dim], mass_per_block(o, v_dim, K, layout, qb0)
