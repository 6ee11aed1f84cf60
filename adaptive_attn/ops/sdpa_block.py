"""One call of the torch block backend's rows in fused SDPA (`gathered_attention`), whose flash backward is
reused.

A call's rows share whether every slot is in use: then one mask serves them all, and a row's Q queries
of H heads go to SDPA as one head of Q * H rows (one large product instead of H small ones). Otherwise
each row needs its own mask, and the heads stay a dimension of SDPA with one shared key head (GQA), so
the mask is [Q, S] per row rather than repeated per head. A call of fewer rows than CPU threads copies the
shared key head (`key_heads`): SDPA's CPU backward is several times slower on fewer (row, key head) pairs
than threads, and budgets that vary per row make such calls often (a row's output is the same bits with
any number of copies).

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
    return out, mass_per_block(o, v_dim, w, layout.real_queries(rows))
