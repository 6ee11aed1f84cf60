"""Sparse attention over shared latent rows (MLA "MQA mode"), one math, several backends.

All heads of a query attend the same selected rows of `kv`; the values are the first `v_dim` columns
of those rows. A selection is either token-level (`block_size == 1`: `indices [B, L, K]`, token
positions) or block-level (`indices [B, nQB, K]`: key blocks of `block_size` tokens wholly before
the query block of `query_block` tokens, which also always attends its own diagonal blocks causally).
Slots holding -1 are unused.

Backends:
- `reference`: dense scores plus a mask built from the selection; O(L^2), the oracle for tests.
- `torch`: gathers only the selected rows (queries chunked to bound memory), so compute follows k;
  block mode feeds the gathered blocks to fused SDPA, reusing its flash backward.
- `triton` (token mode): a fused kernel, forward and backward (`triton_sparse.py`), for GPUs.
- `flex` (block mode): FlexAttention with a BlockMask built from the selection (`flex_sparse.py`);
  compiled with a fused backward on CUDA, eager forward only on CPU. Calls with a slot bias (the
  adaptive budget's soft rank mask, which needs its gradient) use `torch`.
- `auto`: on CUDA `triton` for tokens and `flex` for blocks (in multiples of 16 tokens, FlexAttention's
  smallest tile); `torch` otherwise.
"""

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "torch", "triton", "flex", "auto")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


FLEX_TILE = 16  # FlexAttention's compiled kernels tile by at least 16 queries and keys


def flex_fits(block_size: int, query_block: int) -> bool:
    """Whether FlexAttention takes these blocks: key and query blocks in whole tiles."""
    return block_size > 1 and block_size % FLEX_TILE == 0 and query_block % FLEX_TILE == 0


def resolve_backend(backend: str, device: torch.device, block_size: int = 1, query_block: int | None = None) -> str:
    """`auto`: on CUDA the fused kernels (Triton for tokens, FlexAttention for blocks that fit its
    tiles), else `torch`."""
    query_block = query_block or block_size
    if backend not in BACKENDS:
        raise ValueError(f"model.sparse.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if block_size > 1:
            return "flex" if flex_fits(block_size, query_block) else "torch"
        return "triton" if triton_available() else "torch"
    if backend == "triton" and block_size > 1:
        raise ValueError("model.sparse.backend=triton is token-level: use block_size=1 (or backend torch/flex/auto)")
    if backend == "flex" and block_size == 1:
        raise ValueError("model.sparse.backend=flex is block-level: use block_size > 1 (or backend torch/triton/auto)")
    if backend == "flex" and not flex_fits(block_size, query_block):
        raise ValueError(
            f"model.sparse.backend=flex needs block_size and query_block in multiples of {FLEX_TILE}, "
            f"got {block_size} and {query_block} (or use backend torch/auto)"
        )
    return backend


def _scatter_slots(values: torch.Tensor, indices: torch.Tensor, size: int, fill) -> torch.Tensor:
    """Slot values [B, R, K] -> [B, R, size] at the columns the slots name (-1 = unused), `fill` elsewhere."""
    B, R, _ = indices.shape
    out = values.new_full((B, R, size + 1), fill)
    return out.scatter(-1, indices.masked_fill(indices < 0, size), values)[..., :size]  # unused: a spare column


def _per_key(per_column: torch.Tensor, seq_len: int, block_size: int, query_block: int) -> torch.Tensor:
    """Values per score row and column [B, R, C] -> per (query, key) [B, L, L]: a block row holds for
    every query of its query block, a block column for every key of its block."""
    if block_size == 1:
        return per_column
    pos = torch.arange(seq_len, device=per_column.device)
    return per_column[:, pos // query_block][:, :, pos // block_size]


def _n_columns(seq_len: int, block_size: int, query_block: int) -> int:
    """Score columns: tokens, or key blocks of the padded length."""
    n_qb, m, _ = block_layout(seq_len, block_size, query_block)
    return seq_len if block_size == 1 else n_qb * m


def selection_mask(indices: torch.Tensor, seq_len: int, block_size: int = 1, query_block: int = 1) -> torch.Tensor:
    """The key positions each query attends -> bool [B, L, L]."""
    pos = torch.arange(seq_len, device=indices.device)
    causal = pos[None, :] <= pos[:, None]
    chosen = _scatter_slots(
        torch.ones(indices.shape, dtype=torch.bool, device=indices.device),
        indices,
        _n_columns(seq_len, block_size, query_block),
        False,
    )
    mask = _per_key(chosen, seq_len, block_size, query_block)
    if block_size == 1:
        return mask & causal
    diagonal = (pos[None, :] // query_block) == (pos[:, None] // query_block)
    return (mask | diagonal) & causal


def dense_slot_bias(slot_bias: torch.Tensor, indices, seq_len: int, block_size=1, query_block=1) -> torch.Tensor:
    """Per-slot logit biases [B, R, K] -> per (query, key) biases [B, L, L] (0 where no slot names the key)."""
    per_column = _scatter_slots(slot_bias, indices, _n_columns(seq_len, block_size, query_block), 0.0)
    return _per_key(per_column, seq_len, block_size, query_block)


def reference_sparse_attention(q, kv, indices, *, scale, v_dim, block_size=1, query_block=1, slot_bias=None):
    """Dense masked attention: q [B, H, L, D], kv [B, L, D] -> (out [B, H, L, v_dim], slot probs or None)"""
    L = q.shape[2]
    mask = selection_mask(indices, L, block_size, query_block)
    scores = torch.einsum("bhld,bsd->bhls", q, kv) * scale
    if slot_bias is not None:
        scores = scores + dense_slot_bias(slot_bias, indices, L, block_size, query_block)[:, None]
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhls,bsv->bhlv", probs, kv[..., :v_dim])
    if block_size > 1:
        return out, None
    slot_probs = probs.detach().mean(1).gather(-1, indices.clamp(min=0)) * (indices >= 0)
    return out, slot_probs


def torch_token_attention(q, kv, indices, *, scale, v_dim, slot_bias=None, chunk_size=None, max_chunk_elements=2**22):
    """Gather-based token-level sparse attention -> (out [B, H, L, v_dim], slot probs [B, L, K]).

    Queries are independent, so they are processed in order of their number of used slots: each
    chunk of `chunk_size` queries gathers as many slots as its largest query uses, which sorting makes
    close to every query's own k. Compute follows each query's k, not the batch maximum. By default a
    chunk takes as many queries as keep its gathered rows within `max_chunk_elements`: few, large calls
    (each call has a fixed cost, large on small CPUs: a training step at L=256 ran 10% faster with
    chunks of 512 queries than of 128), yet gathers that stay in cache when k is large.
    """
    B, H, L, D = q.shape
    K = indices.shape[-1]
    chunk_size = chunk_size or max(16, max_chunk_elements // max(1, K * D))
    used = (indices >= 0).sum(-1).flatten()  # [B*L]; valid slots come first
    order = used.argsort()
    counts = used[order]
    # rows of kv across the batch: slot -1 reads row 0 and is masked
    rows = (indices + torch.arange(B, device=q.device)[:, None, None] * L).masked_fill(indices < 0, -1)
    rows = rows.view(B * L, K)[order]
    q_sorted = q.transpose(1, 2).reshape(B * L, H, D).index_select(0, order)
    # one bias per slot, shared by the heads ([C, 1, K]); zeros cost nothing extra inside baddbmm
    if slot_bias is None:
        bias = q.new_zeros(B * L, 1, K)
    else:
        bias = slot_bias.to(q.dtype).reshape(B * L, 1, K).index_select(0, order)
    kv_rows = kv.reshape(B * L, -1)
    slot_probs = q.new_zeros(B * L, K)
    starts = range(0, B * L, chunk_size)
    widths = counts[[min(c0 + chunk_size, B * L) - 1 for c0 in starts]].clamp(min=1).tolist()  # the chunks' largest
    chunks = []
    for c0, n, q_chunk, bias_chunk in zip(starts, widths, q_sorted.split(chunk_size), bias.split(chunk_size)):
        c1 = c0 + q_chunk.shape[0]
        idx = rows[c0:c1, :n]
        keys = kv_rows.index_select(0, idx.clamp(min=0).flatten()).view(c1 - c0, n, -1)  # [C, n, D]
        logits = torch.baddbmm(bias_chunk[..., :n], q_chunk, keys.transpose(1, 2), alpha=scale)  # [C, H, n]
        probs = logits.masked_fill((idx < 0)[:, None], float("-inf")).softmax(-1)
        slot_probs[order[c0:c1], :n] = probs.detach().mean(1).to(slot_probs.dtype)  # autocast: probs may be bf16
        # values are the rows' first v_dim columns; slicing the output is cheaper than the rows' gradient
        chunks.append(torch.einsum("chk,ckv->chv", probs, keys)[..., :v_dim])
    out = torch.cat(chunks).index_select(0, torch.argsort(order))  # back to [B*L] order
    return out.view(B, L, H, v_dim).transpose(1, 2), slot_probs.view(B, L, K)


def sequence_groups(used: torch.Tensor, max_padding: float = 1.25) -> list[slice]:
    """Batch the sequences together, or one by one when their budgets differ so much that padding all
    to the largest would cost over `max_padding` times the work of each sequence's own k.
    used: [B, R] slots in use per score row."""
    B = used.shape[0]
    used = used.float()
    padded = B * used.amax(0).sum()
    own = used.sum()
    return [slice(b, b + 1) for b in range(B)] if B > 1 and padded > max_padding * own else [slice(0, B)]


def block_layout(seq_len: int, block_size: int, query_block: int) -> tuple[int, int, int]:
    """-> (number of query blocks, key blocks per query block, padded length)"""
    n_qb = -(-seq_len // query_block)
    return n_qb, query_block // block_size, n_qb * query_block


def with_diagonal_blocks(
    indices: torch.Tensor, blocks_per_query_block: int, first_query_block: int = 0
) -> torch.Tensor:
    """Append each query block's own key blocks: [B, C, K] (query blocks first.. first+C) -> [B, C, K + m]"""
    B, n_qb, _ = indices.shape
    m = blocks_per_query_block
    qb = torch.arange(first_query_block, first_query_block + n_qb, device=indices.device)
    diag = qb[:, None] * m + torch.arange(m, device=indices.device)
    return torch.cat([indices, diag.expand(B, -1, -1)], dim=-1)


def query_blocks(q: torch.Tensor, query_block: int) -> torch.Tensor:
    """q [B, H, Lp, D] -> [B, nQB, Q, H, D]; a view when q is a transposed [B, Lp, H, D] tensor, as MLA's
    absorbed queries are."""
    B, H, Lp, D = q.shape
    return q.transpose(1, 2).reshape(B, Lp // query_block, query_block, H, D)


def gather_blocks(kv, indices, *, block_size, query_block, qb0, qb1, shared_mask=False):
    """Gather the key blocks of query blocks [qb0, qb1) for SDPA.

    kv [B, Lp, D], indices [B, nQB, K] (past blocks; the diagonal blocks are appended here).
    -> keys [B, C, S, D], attention mask [B, C, Q, S].
    With `shared_mask` (every slot valid) the mask is the same for all rows: [1, 1, Q, S], past
    blocks fully visible and the diagonal causal, which spares SDPA a per-row mask.
    """
    B, Lp, D = kv.shape
    m = query_block // block_size
    blocks = with_diagonal_blocks(indices[:, qb0:qb1], m, qb0)  # [B, C, Kb]
    C, Kb = blocks.shape[1], blocks.shape[2]
    n_kb = Lp // block_size
    if Kb == m:  # the diagonal blocks alone: the query blocks' own rows, no gather
        keys = kv.reshape(B, Lp // query_block, query_block, D)[:, qb0:qb1]
    else:  # whole blocks are contiguous rows of [B * nKB, block_size * D]: index_select copies them at once
        rows = (blocks.clamp(min=0) + torch.arange(B, device=kv.device)[:, None, None] * n_kb).reshape(-1)
        keys = kv.reshape(B * n_kb, block_size * D).index_select(0, rows).view(B, C, Kb * block_size, D)
    arange_q = torch.arange(query_block, device=kv.device)
    if shared_mask:
        past = torch.ones(query_block, (Kb - m) * block_size, dtype=torch.bool, device=kv.device)
        mask = torch.cat([past, arange_q[None, :] <= arange_q[:, None]], dim=1)
        return keys, mask[None, None]
    key_pos = (blocks[..., None] * block_size + torch.arange(block_size, device=kv.device)).view(B, C, -1)
    key_ok = (blocks >= 0)[..., None].expand(-1, -1, -1, block_size).reshape(B, C, -1)
    q_pos = torch.arange(qb0, qb1, device=kv.device)[:, None] * query_block + arange_q
    mask = key_ok[:, :, None, :] & (key_pos[:, :, None, :] <= q_pos[None, :, :, None])
    return keys, mask


def whole_past_query_blocks(used: torch.Tensor, blocks_per_query_block: int) -> int:
    """Leading query blocks whose selection, in every row of used [B, nQB] (slots in use), holds every key
    block before them (their selection is then their whole causal prefix; the first always qualifies)."""
    eligible = torch.arange(used.shape[1], device=used.device) * blocks_per_query_block
    return int((used == eligible).all(0).long().cumprod(0).sum())


def query_block_groups(used: torch.Tensor, chunk_size: int) -> list[tuple[int, int, int]]:
    """Consecutive query blocks sharing one number of used slots -> [(qb0, qb1, slots)], at most
    `chunk_size` blocks each. used: [nQB] slots in use (valid slots come first). Slots beyond a
    group's count are unused in all its rows, so its gather and attention stop there: compute follows
    the realised k, also where early blocks have few predecessors."""
    groups: list[tuple[int, int, int]] = []
    for qb, n in enumerate(used.tolist()):
        if groups and groups[-1][2] == n and qb - groups[-1][0] < chunk_size:
            groups[-1] = (groups[-1][0], qb + 1, n)
        else:
            groups.append((qb, qb + 1, n))
    return groups


def split(x: torch.Tensor, sizes: list[int], dim: int = 0):
    """`x.split(sizes, dim)`, but x itself when there is one part: the backward of a split is a
    concatenation, a full copy even of a single part."""
    return [x] if len(sizes) == 1 else x.split(sizes, dim)


def concat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat(parts, dim)`, but the part itself when there is one (a concatenation copies it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def torch_block_attention(
    q, kv, indices, *, scale, v_dim, block_size, query_block, slot_bias=None, max_call_elements=2**26
):
    """Block-sparse attention over gathered blocks with fused SDPA -> [B, H, L, v_dim].

    All heads of a query block attend the same gathered blocks, so its Q queries of H heads go to SDPA
    as one head of Q * H rows (one large product instead of H small ones; no copy when q is laid out
    [B, L, H, D] in memory). Sequences whose selections use widely different numbers of blocks are
    processed one by one, so each sequence's compute follows its own k. Inputs are cut with `split`,
    whose backward is one concatenation, rather than sliced per chunk, whose backward writes a
    full-size zero gradient each time. One SDPA call takes as many query blocks as keep its
    (query row, key) pairs within `max_call_elements` (the size of a per-row mask): fewer, larger calls
    cost less (one output concatenation, one gather). The leading query blocks whose selection is every
    block before them (those within the first k tokens) take one causal SDPA over their prefix instead.
    A slot bias rides in one extra dimension (query 1, key bias / scale), so SDPA adds it to the logits
    and returns its gradient through the keys'.
    """
    B, H, L, D = q.shape
    n_qb, _, Lp = block_layout(L, block_size, query_block)
    q_rows = q.transpose(1, 2)  # [B, L, H, D]
    if Lp > L:
        q_rows, kv = F.pad(q_rows, (0, 0, 0, 0, 0, Lp - L)), F.pad(kv, (0, 0, 0, Lp - L))
    used = (indices >= 0).sum(-1)  # [B, nQB]
    seq_groups = sequence_groups(used)
    sizes = [g.stop - g.start for g in seq_groups]
    outs = []
    for rows_b, q_b, kv_b in zip(seq_groups, split(q_rows, sizes), split(kv, sizes)):
        nb, m = q_b.shape[0], query_block // block_size
        used_b = used[rows_b].amax(0)
        # leading query blocks that selected every block before them attend their whole causal prefix: one
        # call instead of one per block (each selects a different number of blocks), so from two blocks on
        n_dense = 0 if slot_bias is not None else whole_past_query_blocks(used[rows_b], m)
        n_dense = n_dense if n_dense > 1 else 0
        pairs_per_block = nb * query_block * H * (int(used_b.max()) + m) * block_size
        groups = [
            (qb0 + n_dense, qb1 + n_dense, slots)
            for qb0, qb1, slots in query_block_groups(used_b[n_dense:], max(1, max_call_elements // pairs_per_block))
        ]
        part_sizes = [(qb1 - qb0) * query_block for qb0, qb1, _ in groups]
        q_parts = split(q_b, [n_dense * query_block] + part_sizes if n_dense else part_sizes, dim=1)
        chunks = []
        if n_dense:  # one causal SDPA over the prefix: no gather, no mask, only the causal half computed
            q_dense, *q_parts = q_parts
            keys = kv_b[:, None, : n_dense * query_block].expand(-1, H, -1, -1)
            o = F.scaled_dot_product_attention(q_dense.transpose(1, 2), keys, keys, is_causal=True, scale=scale)
            chunks.append(o.transpose(1, 2))
        for (qb0, qb1, slots), q_part in zip(groups, q_parts):
            trimmed = indices[rows_b, :, :slots]
            keys, mask = gather_blocks(
                kv_b,
                trimmed,
                block_size=block_size,
                query_block=query_block,
                qb0=qb0,
                qb1=qb1,
                shared_mask=bool((trimmed[:, qb0:qb1] >= 0).all()),
            )
            queries = q_part.reshape(-1, 1, query_block * H, D)  # one SDPA batch row per query block
            keys = keys.flatten(0, 1)[:, None]
            if slot_bias is not None:
                bias = slot_bias[rows_b, qb0:qb1, :slots].to(q.dtype)
                bias = torch.cat([bias, bias.new_zeros(nb, qb1 - qb0, m)], dim=-1)
                queries = torch.cat([queries, queries.new_ones(*queries.shape[:-1], 1)], dim=-1)
                keys = torch.cat([keys, (bias / scale).repeat_interleave(block_size, -1).view(*keys.shape[:-1], 1)], -1)
            mask = mask.repeat_interleave(H, dim=2).flatten(0, 1)[:, None]  # one row per (query, head)
            # values are the keys (latent rows); a bias column's output is cut off below
            o = F.scaled_dot_product_attention(queries, keys, keys, attn_mask=mask, scale=scale)
            chunks.append(o.view(nb, (qb1 - qb0) * query_block, H, -1))
        outs.append(concat(chunks, dim=1))
    out = concat(outs)  # [B, Lp, H, D]
    return out[:, :L, :, :v_dim].transpose(1, 2)


def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float,
    v_dim: int,
    block_size: int = 1,
    query_block: int = 1,
    backend: str = "torch",
    slot_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, H, L, D], kv [B, L, D], indices (see module doc) -> (out [B, H, L, v_dim], slot probs)

    `slot_bias` ([B, R, K], same shape as indices) is added to each slot's logit (after scaling); the
    soft rank mask of the adaptive budget is exactly 0 in the forward pass and only carries gradient.
    Token mode also returns the head-averaged attention probabilities of each selected slot
    ([B, L, K], detached; the indexer's KL target), block mode None.
    """
    backend = resolve_backend(backend, q.device, block_size, query_block)
    # one dtype for both: under autocast its dtype, as dense SDPA runs then (the fused kernels would
    # otherwise get float32 inputs, or queries and rows of different dtypes)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(q.dtype, kv.dtype)
    q, kv = q.to(dtype), kv.to(dtype)
    layout = dict(block_size=block_size, query_block=query_block)
    if backend == "triton":
        from adaptive_attn.ops.triton_sparse import triton_token_attention

        return triton_token_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_bias=slot_bias)
    if backend == "flex" and slot_bias is None:
        from adaptive_attn.ops.flex_sparse import flex_block_attention

        return flex_block_attention(q, kv, indices, scale=scale, v_dim=v_dim, **layout), None
    if backend == "reference":
        return reference_sparse_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_bias=slot_bias, **layout)
    if block_size == 1:
        return torch_token_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_bias=slot_bias)
    return torch_block_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_bias=slot_bias, **layout), None
