"""The torch block backend: the selected key blocks are gathered and fed to fused SDPA, whose flash
backward is reused, so compute follows k.

Each (sequence, query block) row attends its selected key blocks and its own diagonal blocks, with all
its heads. Four things keep the work close to the selection's own:
- the leading query blocks that selected every block before them, in every sequence, take one causal
  SDPA over their prefix (`whole_past_query_blocks`): no gather, no mask, only the causal half computed
  (a slot bias there rides in a key column per query block, so a biased block does not end the prefix);
- the other rows are grouped by slot width (`slot_widths`: a row's own count, rounded up by at most 1/8)
  and, where a slot bias needs its own column (below), by whether it carries a gradient; each group takes
  one SDPA call (a few within `max_call` pairs), whichever sequences and positions its rows come from, so
  budgets that vary per sequence and per query block take about as many calls as there are widths
  (`row_groups`);
- rows are reordered only when they are not in group order already (one copy each way, whose backward is a
  copy too: `permute_rows`), and inputs are cut with `split`, whose backward is one concatenation, rather
  than sliced per call, whose backward writes a full-size zero gradient each time; for the same reason one
  gather of key blocks serves every call (a gather's backward scatters into a zeroed gradient of all the
  latents, and with two CPU threads each such scatter costs a few hundred microseconds however few rows it
  adds);
- a call of fewer rows than CPU threads copies the shared key head (`key_heads`): SDPA's CPU backward is
  several times slower on fewer (row, key head) pairs than threads, and budgets that vary per row make
  such calls often.
A group's rows share whether every slot is in use: then one mask serves them all, and a row's Q queries
of H heads go to SDPA as one head of Q * H rows (one large product instead of H small ones). Otherwise
each row needs its own mask, and the heads stay a dimension of SDPA with one shared key head (GQA), so
the mask is [Q, S] per row rather than repeated per head. Every grouping key is a property of the row
alone, so a row's arithmetic never depends on other rows' budgets (the key head copies depend on a call's
size, but a row's output is the same bits with any number of them).

A slot bias b_j adds to the logits of slot j's keys; only the rows marked `biased_rows` pay for it. The
adaptive budget's rank mask is 0 in value and needs only its gradient, sum over queries i and keys s of
block j of dL/dlogit_is = sum_i dO_i . W_ij - (dO_i . O_i) m_ij, where W_ij is the part of O_i that block j's
values make and m_ij the block's mass. Where the block indicators fit (below), two taps that change nothing
in the forward pass add both terms in backward (`rank_mask`): no extra column, and the rows marked and
unmarked share their calls (an unmarked row's bias is 0 in value and gradient). Any other bias rides in
one extra dimension (query 1, key bias / scale), so SDPA adds it to the logits and returns its gradient
through the keys' (an odd width: such calls run about a third slower on a CPU).

The values are the latent rows' first `v_dim` columns; the rest of a row (MLA's RoPE key) is no value,
so where a call's key blocks fit in those columns they carry one-hot block indicators, and the output
there is each query's attention mass per key block: the indexer KL's target, at no extra cost.
"""

import functools

import torch
import torch.nn.functional as F

from adaptive_attn.ops.layout import SparseLayout, visible_keys
from adaptive_attn.ops.rank_mask import MassTap, ValueTap
from adaptive_attn.ops.rows import concat, permute_rows, split


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
    q, latents, indices, layout: SparseLayout, *, scale, v_dim, slot_bias=None, biased_rows=None, max_call=2**26
):
    """q [B, H, L, D], latents [B, L, D], indices [B, nQB, K] -> (out [B, H, L, v_dim], block mass [B, nQB, K]:
    each selected block's attention mass, summed over its query block's queries and averaged over heads;
    NaN in the rows whose call had no room for it, None when no row had).
    One SDPA call takes as many rows as keep its (query row, key) pairs within `max_call`.
    `biased_rows` [nQB] (bool, with a slot bias) marks the query blocks whose bias carries a gradient;
    the others' bias is zero in value and gradient, so they skip its column (by default every block)."""
    B, H, L, D = q.shape
    R, Q, K = layout.n_rows, layout.query_block, indices.shape[-1]
    q_rows, latents = layout.pad(q.transpose(1, 2), 1), layout.pad(latents, 1)  # [B, Lp, H, D], [B, Lp, D]
    flags = torch.full((R,), slot_bias is not None, device=q.device) if biased_rows is None else biased_rows
    flags = flags & (slot_bias is not None)
    n_prefix = whole_past_query_blocks((indices >= 0).sum(-1), layout)
    n_prefix = n_prefix if n_prefix > 1 else 0  # one call instead of one per block, so from two blocks on
    q_prefix, q_rest = split(q_rows, [n_prefix * Q, (R - n_prefix) * Q], dim=1) if n_prefix else (None, q_rows)
    outs, masses = [], []
    if n_prefix:
        bias = slot_bias[:, :n_prefix] if bool(flags[:n_prefix].any()) else None
        o, mass = prefix_attention(q_prefix, latents, indices[:, :n_prefix], layout, scale, v_dim, bias)
        outs.append(o)
        masses.append(mass)
    if n_prefix < R:
        bias = None if slot_bias is None else slot_bias[:, n_prefix:]
        o, mass = grouped_attention(
            q_rest, latents, indices[:, n_prefix:], bias, flags[n_prefix:], n_prefix, layout, scale, v_dim, max_call
        )
        outs.append(o)
        masses.append(mass)
    mass = concat(masses, dim=1)
    carried = K > 0 and bool((~mass[..., 0].isnan() & (indices[..., 0] >= 0)).any())  # by a row that selected
    return concat(outs, dim=1)[:, :L].transpose(1, 2), mass if carried else None


def grouped_attention(q, latents, indices, slot_bias, flags, row0: int, layout: SparseLayout, scale, v_dim, max_call):
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
    zero_bias = bias is not None and not bool(bias.detach().any())  # the rank mask: through taps (`rank_mask`)
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
    outs, masses = [], []
    for (part, width, flag, full), q_part, group_keys, group_blocks in zip(groups, q_parts, keys, blocks):
        row_bias = bias[part, :width] if flag else None
        mask = None if full else layout.key_mask(group_blocks, rows[part])
        o, mass = gathered_attention(q_part, group_keys, mask, rows[part], row_bias, layout, scale, v_dim, zero_bias)
        outs.append(o)
        masses.append(F.pad(mass, (0, width_max - width)))  # unused slots hold no mass
    out, mass = concat(outs), concat(masses)
    if order is not None:
        out, mass = permute_rows(out, inverse, order), mass.index_select(0, inverse)
    return out.view(B, rows_per_seq * Q, H, v_dim), mass[:, :K].view(B, rows_per_seq, K)


def block_indicator(S: int, block_size: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """[S, width] one-hot rows: row s is 1 in the column of its key block, s // block_size (none past width).
    Built once per shape, dtype and device, as is `shared_mask`: each call of the op would otherwise spend a
    few small operations on them, each of which may wake the CPU's threads."""
    return _block_indicator(S, block_size, width, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _block_indicator(S: int, block_size: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # one first made in evaluation serves training too
        block_of = torch.arange(S, device=device) // block_size
        return (block_of[:, None] == torch.arange(width, device=device)).to(dtype)


def shared_mask(layout: SparseLayout, past_blocks: int, heads: int, like: torch.Tensor) -> torch.Tensor:
    """The additive mask of rows whose every slot is in use, [1, 1, Q * heads, (past_blocks + m) * block_size]:
    the past blocks visible, the diagonal ones causal; a query's heads are consecutive rows."""
    return _shared_mask(layout.query_block, past_blocks * layout.block_size, heads, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _shared_mask(query_block: int, past: int, heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        visible = visible_keys(query_block, past, device)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))
        return mask.repeat_interleave(heads, dim=0)[None, None]


def indicator_values(
    keys: torch.Tensor, v_dim: int, n_blocks: int, block_size: int, value_part: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """keys [..., S, W] -> (values, whether they carry block indicators): the keys' first v_dim columns (or
    `value_part`, if given), then for each of the n_blocks key blocks a column that is 1 on its rows; the keys
    themselves when the indicators do not fit in the other W - v_dim columns (whose output no one reads)."""
    S, W = keys.shape[-2:]
    if n_blocks > W - v_dim:
        return keys, False
    indicator = block_indicator(S, block_size, W - v_dim, keys)
    value_part = keys[..., :v_dim] if value_part is None else value_part
    return torch.cat([value_part, indicator.expand(*keys.shape[:-2], S, W - v_dim)], -1), True


def mass_per_block(o: torch.Tensor, v_dim: int, n_blocks: int, real: torch.Tensor) -> torch.Tensor:
    """Output rows [n, Q, H, W] over indicator values, real (not padding) queries [n, Q] -> each key block's
    mass summed over the real queries, averaged over heads: [n, n_blocks]"""
    return (o.detach()[..., v_dim : v_dim + n_blocks].mean(2) * real[..., None]).sum(1)


def prefix_attention(q, latents, indices, layout: SparseLayout, scale, v_dim, slot_bias=None):
    """The leading query blocks that selected their whole past: one causal SDPA over their prefix, no gather.
    q [B, P, H, D], indices and slot_bias [B, n, K] (P = n query blocks) -> (out [B, P, H, v_dim], block mass
    [B, n, K]). Each query block's slot bias rides in a key column of its own, which only its queries read
    (a one-hot query column), so a biased query block keeps the prefix's one call."""
    B, P, H, _ = q.shape
    n, Q, bs = indices.shape[1], layout.query_block, layout.block_size
    queries, keys = q.transpose(1, 2), latents[:, None, :P]
    n_blocks = P // bs
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
    real = (torch.arange(P, device=q.device) < layout.seq_len).view(n, Q)
    mass = mass_per_block(o.reshape(B * n, Q, H, -1), v_dim, n_blocks, real.repeat(B, 1)).view(B, n, n_blocks)
    return o[..., :v_dim], mass.gather(-1, indices.clamp(min=0)) * (indices >= 0)  # per block -> per slot


def key_heads(n: int, heads: int, device: torch.device) -> int:
    """Key heads of one SDPA call over n rows: 1 (the key head all heads share), except where a CPU call would
    hold fewer (row, key head) pairs than threads; then the fewest copies of it, a divisor of `heads`, that make
    enough. SDPA's CPU backward runs one such pair on two threads several times slower than on one (a row of
    128 queries x 4 heads over 1152 keys: 13 ms against 2.6)."""
    if device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    return next((s for s in range(1, heads + 1) if heads % s == 0 and n * s >= threads), heads)


def gathered_attention(q, keys, mask, rows, slot_bias, layout: SparseLayout, scale, v_dim, zero_bias: bool):
    """n rows over their gathered key blocks (`SparseLayout.gather_blocks`, the w selected then the diagonal
    ones): q [n, Q, H, D], keys [n, S, D], mask [n, Q, S] per row (`SparseLayout.key_mask`) or None where
    every slot of every row is in use (`shared_mask`), rows [n] (each row's query block), slot_bias [n, w] or
    None; `zero_bias`: the slot bias is 0 in value (checked once per call of the op) -> (out [n, Q, H, v_dim],
    the mass of the w selected slots [n, w], NaN where it did not fit)"""
    n, Q, H, D = q.shape
    m, bs = layout.blocks_per_query_block, layout.block_size
    w = keys.shape[1] // bs - m
    keys = keys[:, None]  # [n, 1, S, D]: one SDPA batch row per (sequence, query block)
    shared = mask is None
    if shared:  # one mask for all: a row's Q * H (query, head) pairs as one head
        queries, mask = q.reshape(n, 1, Q * H, D), shared_mask(layout, w, H, q)
    else:  # a mask per row, shared by its H heads (one key head for them), never repeated per head
        queries, mask = q.transpose(1, 2), mask[:, None]
    bias = None if slot_bias is None else torch.cat([slot_bias, slot_bias.new_zeros(n, m)], -1).to(q.dtype)
    fits = w + m <= keys.shape[-1] - v_dim  # the block indicators, in the value columns past v_dim
    through_values = bias is not None and fits and zero_bias
    if bias is not None and not through_values:  # a bias of any value: in one extra dimension of queries and keys
        queries = torch.cat([queries, queries.new_ones(*queries.shape[:-1], 1)], dim=-1)
        keys = torch.cat([keys, (bias / scale).repeat_interleave(bs, -1).view(*keys.shape[:-1], 1)], dim=-1)
    # a bias of value 0 (the rank mask): only its gradient, from taps on the values and the output
    value_part = ValueTap.apply(keys[..., :v_dim], bias, bs) if through_values else None
    values, carries_mass = indicator_values(keys, v_dim, w + m, bs, value_part)
    copies = key_heads(n, H, q.device)
    if shared:
        queries, mask = queries.reshape(n, copies, -1, queries.shape[-1]), mask.view(1, copies, -1, mask.shape[-1])
    keys, values = keys.expand(-1, copies, -1, -1), values.expand(-1, copies, -1, -1)
    gqa = queries.shape[1] != copies
    o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
    o = o.reshape(n, Q, H, -1) if shared else o.transpose(1, 2)
    out = o[..., :v_dim]
    if through_values:
        out = MassTap.apply(out, o.detach()[..., v_dim : v_dim + w + m], bias)  # masses per query and head
    if not carries_mass:
        return out, o.new_full((n, w), float("nan"))
    real = (rows[:, None] * Q + torch.arange(Q, device=q.device)) < layout.seq_len
    return out, mass_per_block(o, v_dim, w, real)
