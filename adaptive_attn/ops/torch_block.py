"""The torch block backend: the selected key blocks are gathered and fed to fused SDPA (`sdpa_block`), whose
flash backward is reused, so compute follows k; the `cpu` backend feeds the same calls to a C++ kernel
instead (`block_kernel`).

Each (sequence, query block) row attends its selected key blocks and its own diagonal blocks, with all
its heads. Three things keep the work close to the selection's own:
- the leading query blocks that selected every block before them, in every sequence, take one causal
  call over their prefix (`whole_past_query_blocks`): no gather, no mask, only the causal half computed
  (in SDPA a slot bias there rides in a key column per query block, so a biased block does not end the
  prefix; the kernel's prefix takes no bias, so in the `cpu` backend it does);
- the other rows are grouped by slot width (`slot_widths`: a row's own count, rounded up by at most 1/8),
  by whether every slot is in use and, where a slot bias needs its own column (`sdpa_block`), by whether it
  carries a gradient; each group takes one call (a few within `max_call` pairs), whichever sequences and
  positions its rows come from, so budgets that vary per sequence and per query block take about as many
  calls as there are widths (`row_groups`);
- rows are reordered only when they are not in group order already (one copy each way, whose backward is a
  copy too: `permute_rows`), and inputs are cut with `split`, whose backward is one concatenation, rather
  than sliced per call, whose backward writes a full-size zero gradient each time; for the same reason one
  gather of key blocks serves every call (a gather's backward scatters into a zeroed gradient of all the
  latents, and with two CPU threads each such scatter costs a few hundred microseconds however few rows it
  adds).
Every grouping key is a property of the row alone, so a row's arithmetic never depends on other rows'
budgets.
"""

import torch
import torch.nn.functional as F

from adaptive_attn.ops import block_kernel
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.rows import concat, permute_rows, split
from adaptive_attn.ops.sdpa_block import gathered_attention, indicator_values, mass_per_block


def whole_past_query_blocks(used: torch.Tensor, layout: SparseLayout) -> int:
    """Leading query blocks whose selection, in every row of used [B, nQB], holds every key block before
    them (their selection is then their whole causal prefix; the first always qualifies)."""
    return int((used == layout.n_eligible).all(0).long().cumprod(0).sum())


def slot_widths(used: torch.Tensor, least_step: int = 1) -> torch.Tensor:
    """The slots each row gathers for the n it uses: n rounded up to a multiple of 2^(floor(log2 n) - 3), at most
    1/8 more, or of `least_step` where that is larger, so that budgets that vary a little share a width."""
    n = used.long()
    bit_length = torch.floor(torch.log2(n.clamp_min(1).double())).long() + 1
    step = (1 << (bit_length - 4).clamp_min(0)).clamp_min(least_step)
    return (n + step - 1) // step * step


def row_groups(
    used: torch.Tensor, flags: torch.Tensor, layout: SparseLayout, heads: int, max_call: int, free_columns: int = -1
):
    """Rows by their slots in use [n] and bias flag [n] -> (the permutation that sorts them by group, or None
    when they are in order already; [(positions in that order, width, flag, full)], each cut so that its
    (query row, key) pairs stay within `max_call`). A group's rows share a slot width, whether every slot is
    in use (`full`) and a flag, except where a bias of value 0 can take its gradient from the block
    indicators (`rank_mask`): rows whose blocks fit in the `free_columns` value columns then group whatever
    their flag (an unflagged row's bias is 0 in value and gradient, so it leaves the row bit for bit as it
    was), and the group is flagged if any of its rows is."""
    widths = slot_widths(used)
    merged = widths + layout.blocks_per_query_block <= free_columns
    key = (widths * 2 + (flags & ~merged).long()) * 2 + (used == widths).long()
    order = torch.argsort(key, stable=True)
    flags = flags[order]
    pairs_per_block = layout.query_block * heads * layout.block_size
    groups, start = [], 0
    for value, count in zip(*[t.tolist() for t in torch.unique_consecutive(key[order], return_counts=True)]):
        width, full = value // 4, bool(value % 2)
        per_call = max(1, max_call // (pairs_per_block * (width + layout.blocks_per_query_block)))
        for chunk in range(start, start + count, per_call):
            part = slice(chunk, min(chunk + per_call, start + count))
            groups.append((part, width, bool(flags[part].any()), full))
        start += count
    in_order = bool((order == torch.arange(len(order), device=order.device)).all())
    return None if in_order else order, groups


def torch_block_attention(
    q,
    latents,
    indices,
    layout: SparseLayout,
    *,
    scale,
    v_dim,
    slot_bias=None,
    biased_rows=None,
    max_call=2**26,
    fused=False,
):
    """q [B, H, L, D], latents [B, L, D], indices [B, nQB, K] -> (out [B, H, L, v_dim], block mass [B, nQB, K]:
    each selected block's attention mass, summed over its query block's queries and averaged over heads;
    NaN in the rows whose call had no room for it, None when no row had).
    One SDPA call takes as many rows as keep its (query row, key) pairs within `max_call`.
    `biased_rows` [nQB] (bool, with a slot bias) marks the query blocks whose bias carries a gradient;
    the others' bias is zero in value and gradient, so they skip its column (by default every block).
    `fused`: each call in the `cpu` backend's kernel (`block_kernel`) instead of SDPA."""
    B, H, L, D = q.shape
    R, Q, K = layout.n_rows, layout.query_block, indices.shape[-1]
    fused = fused and block_kernel.takes(q)
    q_rows, latents = layout.pad(q.transpose(1, 2), 1), layout.pad(latents, 1)  # [B, Lp, H, D], [B, Lp, D]
    flags = torch.full((R,), slot_bias is not None, device=q.device) if biased_rows is None else biased_rows
    flags = flags & (slot_bias is not None)
    n_prefix = whole_past_query_blocks((indices >= 0).sum(-1), layout)
    if fused and bool(flags.any()):  # the kernel's prefix takes no bias: a biased block ends it
        n_prefix = min(n_prefix, int(flags.long().argmax()))
    n_prefix = n_prefix if n_prefix > 1 else 0  # one call instead of one per block, so from two blocks on
    q_prefix, q_rest = split(q_rows, [n_prefix * Q, (R - n_prefix) * Q], dim=1) if n_prefix else (None, q_rows)
    outs, masses = [], []
    if n_prefix:
        bias = slot_bias[:, :n_prefix] if bool(flags[:n_prefix].any()) else None
        o, mass = prefix_attention(q_prefix, latents, indices[:, :n_prefix], layout, scale, v_dim, bias, fused)
        outs.append(o)
        masses.append(mass)
    if n_prefix < R:
        bias = None if slot_bias is None else slot_bias[:, n_prefix:]
        args = (n_prefix, layout, scale, v_dim, max_call, fused)
        o, mass = grouped_attention(q_rest, latents, indices[:, n_prefix:], bias, flags[n_prefix:], *args)
        outs.append(o)
        masses.append(mass)
    mass = concat(masses, dim=1)
    carried = K > 0 and bool((~mass[..., 0].isnan() & (indices[..., 0] >= 0)).any())  # by a row that selected
    return concat(outs, dim=1)[:, :L].transpose(1, 2), mass if carried else None


def grouped_attention(
    q, latents, indices, slot_bias, flags, row0: int, layout: SparseLayout, scale, v_dim, max_call, fused=False
):
    """Query blocks row0.. of every sequence, in the calls of `row_groups`: q [B, R' * Q, H, D], indices and
    slot_bias [B, R', K], flags [R'] -> (out [B, R' * Q, H, v_dim], block mass [B, R', K])"""
    B, _, H, D = q.shape
    rows_per_seq, K, Q = indices.shape[1], indices.shape[2], layout.query_block
    width_max = int(slot_widths(torch.tensor(K)))  # room for every row's width
    indices = F.pad(indices, (0, width_max - K), value=-1).reshape(B * rows_per_seq, width_max)
    bias = None if slot_bias is None else F.pad(slot_bias, (0, width_max - K)).reshape(B * rows_per_seq, width_max)
    flat = torch.arange(B * rows_per_seq, device=q.device)
    seqs, rows = flat // rows_per_seq, flat % rows_per_seq + row0
    q = q.reshape(B * rows_per_seq, Q, H, D)
    if fused:  # the kernel takes any bias, so rows share calls whatever their flag
        zero_bias, free = False, width_max + layout.blocks_per_query_block
    else:  # SDPA takes a rank mask (a bias of value 0) through taps (`rank_mask`) where the indicators fit
        zero_bias = bias is not None and not bool(bias.detach().any())
        free = latents.shape[-1] - v_dim if zero_bias else -1
    order, groups = row_groups((indices >= 0).sum(-1), flags.repeat(B), layout, H, max_call, free)
    if order is not None:
        inverse = torch.argsort(order)
        q = permute_rows(q, order, inverse)
        indices, seqs, rows = (t.index_select(0, order) for t in (indices, seqs, rows))
        bias = None if bias is None else permute_rows(bias, order, inverse)
    blocks = [layout.key_blocks(indices[part, :width], rows[part]) for part, width, _, _ in groups]
    keys = layout.gather_blocks(latents, blocks, [seqs[group[0]] for group in groups])
    q_parts = split(q, [group[0].stop - group[0].start for group in groups])
    geometry = (layout.block_size, scale, v_dim)
    outs, masses = [], []
    for (part, width, flag, full), q_part, group_keys, group_blocks in zip(groups, q_parts, keys, blocks):
        row_bias = bias[part, :width].to(q.dtype) if flag else None
        if fused:
            used = None if full else indices[part, :width] >= 0
            o, per_query = block_kernel.block_attention(q_part, group_keys, used, row_bias, width, *geometry)
            mass = mass_per_block(per_query, 0, width, layout.real_queries(rows[part]))
        else:
            mask = None if full else layout.key_mask(group_blocks, rows[part])
            args = (rows[part], row_bias, layout, scale, v_dim, zero_bias)
            o, mass = gathered_attention(q_part, group_keys, mask, *args)
        outs.append(o)
        masses.append(F.pad(mass, (0, width_max - width)))  # unused slots hold no mass
    out, mass = concat(outs), concat(masses)
    if order is not None:
        out, mass = permute_rows(out, inverse, order), mass.index_select(0, inverse)
    return out.view(B, rows_per_seq * Q, H, v_dim), mass[:, :K].view(B, rows_per_seq, K)


def prefix_attention(q, latents, indices, layout: SparseLayout, scale, v_dim, slot_bias=None, fused=False):
    """The leading query blocks that selected their whole past: one causal SDPA over their prefix, no gather.
    q [B, P, H, D], indices and slot_bias [B, n, K] (P = n query blocks) -> (out [B, P, H, v_dim], block mass
    [B, n, K]). Each query block's slot bias rides in a key column of its own, which only its queries read
    (a one-hot query column), so a biased query block keeps the prefix's one call. `fused` (no bias): one call
    of the `cpu` backend's kernel, whose causal diagonal is then the whole prefix."""
    B, P, H, _ = q.shape
    n, Q, bs = indices.shape[1], layout.query_block, layout.block_size
    n_blocks = P // bs
    real = layout.real_queries(torch.arange(n, device=q.device)).repeat(B, 1)
    if fused:  # no bias here (`torch_block_attention`)
        o, per_query = block_kernel.block_attention(q, latents, None, None, 0, bs, scale, v_dim)
        mass = mass_per_block(per_query.reshape(B * n, Q, H, -1), 0, n_blocks, real).view(B, n, n_blocks)
        return o, mass.gather(-1, indices.clamp(min=0)) * (indices >= 0)
    queries, keys = q.transpose(1, 2), latents[:, None, :P]
    if slot_bias is not None:
        per_block = layout.scatter_slots(slot_bias.to(q.dtype), indices, 0.0)[..., :n_blocks]  # [B, n, n_blocks]
        columns = -(-n // 8) * 8  # whole multiples of 8, which GPU kernels need to stay fused
        key_bias = F.pad(per_block / scale, (0, 0, 0, columns - n)).repeat_interleave(bs, -1).transpose(1, 2)
        own_block = F.one_hot(torch.arange(P, device=q.device) // Q, columns).to(q.dtype)  # [P, columns]
        queries = torch.cat([queries, own_block.expand(B, H, P, columns)], -1)
        keys = torch.cat([keys, key_bias[:, None]], -1)
    values, carries_mass = indicator_values(keys, v_dim, n_blocks, bs)  # built once for all heads
    keys, values = keys.expand(-1, H, -1, -1), values.expand(-1, H, -1, -1)
    o = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale).transpose(1, 2)
    if not carries_mass:
        return o[..., :v_dim], torch.full(indices.shape, float("nan"), dtype=o.dtype, device=o.device)
    mass = mass_per_block(o.reshape(B * n, Q, H, -1), v_dim, n_blocks, real).view(B, n, n_blocks)
    return o[..., :v_dim], mass.gather(-1, indices.clamp(min=0)) * (indices >= 0)  # per block -> per slot
