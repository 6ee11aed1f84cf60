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
  compiled with a fused backward on CUDA, eager forward only on CPU. The adaptive budget's soft rank
  gate (a weight applied after the softmax) is not expressible there, so gated calls use `torch`.
- `auto`: on CUDA `triton` for tokens and `flex` for blocks; `torch` otherwise.
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


def resolve_backend(backend: str, device: torch.device, block_size: int = 1) -> str:
    """`auto`: on CUDA the fused kernels (Triton for tokens, FlexAttention for blocks), else `torch`."""
    if backend not in BACKENDS:
        raise ValueError(f"model.sparse.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        return "flex" if block_size > 1 else ("triton" if triton_available() else "torch")
    if backend == "triton" and block_size > 1:
        raise ValueError("model.sparse.backend=triton is token-level: use block_size=1 (or backend torch/flex/auto)")
    if backend == "flex" and block_size == 1:
        raise ValueError("model.sparse.backend=flex is block-level: use block_size > 1 (or backend torch/triton/auto)")
    return backend


def _scatter_mask(indices: torch.Tensor, size: int) -> torch.Tensor:
    """indices [B, R, K] (-1 = unused) -> bool [B, R, size], True at the used indices."""
    B, R, _ = indices.shape
    mask = torch.zeros(B, R, size + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.masked_fill(indices < 0, size), True)  # unused slots land in a spare column
    return mask[..., :size]


def selection_mask(indices: torch.Tensor, seq_len: int, block_size: int = 1, query_block: int = 1) -> torch.Tensor:
    """The key positions each query attends -> bool [B, L, L]."""
    pos = torch.arange(seq_len, device=indices.device)
    causal = pos[None, :] <= pos[:, None]
    if block_size == 1:
        return _scatter_mask(indices, seq_len) & causal
    chosen = _scatter_mask(indices, -(-seq_len // query_block) * (query_block // block_size))
    row_blocks = chosen[:, pos // query_block]  # [B, L, nKB]
    mask = row_blocks[:, :, pos // block_size]  # [B, L, L]
    diagonal = (pos[None, :] // query_block) == (pos[:, None] // query_block)
    return (mask | diagonal) & causal


def dense_slot_gate(slot_gate: torch.Tensor, indices, seq_len: int, block_size=1, query_block=1) -> torch.Tensor:
    """Per-slot gates [B, R, K] -> per (query, key) gates [B, L, L] (1 where no slot names the key)."""
    B, R, K = indices.shape
    if block_size > 1:  # a block slot gates all its keys, for every query of the query block
        n_kb = -(-seq_len // query_block) * (query_block // block_size)
        per_block = torch.ones(B, R, n_kb + 1, dtype=slot_gate.dtype, device=slot_gate.device)
        per_block = per_block.scatter(-1, indices.masked_fill(indices < 0, n_kb), slot_gate)[..., :n_kb]
        pos = torch.arange(seq_len, device=indices.device)
        return per_block[:, pos // query_block][:, :, pos // block_size]
    gate = torch.ones(B, R, seq_len + 1, dtype=slot_gate.dtype, device=slot_gate.device)
    return gate.scatter(-1, indices.masked_fill(indices < 0, seq_len), slot_gate)[..., :seq_len]


def reference_sparse_attention(q, kv, indices, *, scale, v_dim, block_size=1, query_block=1, slot_gate=None):
    """Dense masked attention: q [B, H, L, D], kv [B, L, D] -> (out [B, H, L, v_dim], slot probs or None)"""
    L = q.shape[2]
    mask = selection_mask(indices, L, block_size, query_block)
    scores = torch.einsum("bhld,bsd->bhls", q, kv) * scale
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    weights = (
        probs if slot_gate is None else probs * dense_slot_gate(slot_gate, indices, L, block_size, query_block)[:, None]
    )
    out = torch.einsum("bhls,bsv->bhlv", weights, kv[..., :v_dim])
    if block_size > 1:
        return out, None
    slot_probs = probs.detach().mean(1).gather(-1, indices.clamp(min=0)) * (indices >= 0)
    return out, slot_probs


def gather_rows(kv: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """kv [B, S, D], indices [B, T, K] (-1 allowed) -> [B, T, K, D] (slot -1 reads row 0)"""
    B, T, K = indices.shape
    flat = indices.clamp(min=0).reshape(B, T * K, 1).expand(-1, -1, kv.shape[-1])
    return kv.gather(1, flat).view(B, T, K, -1)


def torch_token_attention(q, kv, indices, *, scale, v_dim, slot_gate=None, chunk_size=128):
    """Gather-based token-level sparse attention -> (out [B, H, L, v_dim], slot probs [B, L, K]).

    Each chunk of queries gathers only as many slots as its queries use, and sequences whose k differ
    widely are processed one by one, so compute follows each sequence's (and each query's) own k.
    """
    B, H, L, D = q.shape
    used = (indices >= 0).sum(-1)  # [B, L]; valid slots come first
    groups = sequence_groups(F.pad(used, (0, -L % chunk_size)).view(B, -1, chunk_size))
    slot_probs = q.new_zeros(indices.shape)
    outs = []
    for rows_b in groups:
        chunks = []
        for c0 in range(0, L, chunk_size):
            c1 = min(c0 + chunk_size, L)
            n = max(int(used[rows_b, c0:c1].max()), 1)
            idx = indices[rows_b, c0:c1, :n]
            rows = gather_rows(kv[rows_b], idx)  # [b, C, n, D]
            logits = torch.einsum("bhcd,bckd->bhck", q[rows_b, :, c0:c1], rows) * scale
            probs = logits.masked_fill((idx < 0)[:, None], float("-inf")).softmax(-1)
            slot_probs[rows_b, c0:c1, :n] = probs.detach().mean(1)
            if slot_gate is not None:
                probs = probs * slot_gate[rows_b, c0:c1, None, :n].transpose(1, 2)
            # values are the rows' first v_dim columns; slicing the output is cheaper than the rows' gradient
            chunks.append(torch.einsum("bhck,bckv->bhcv", probs, rows)[..., :v_dim])
        outs.append(torch.cat(chunks, dim=2))
    return torch.cat(outs, dim=0), slot_probs


def sequence_groups(used: torch.Tensor, max_padding: float = 1.25) -> list[slice]:
    """Batch the sequences together, or one by one when their budgets differ so much that padding all
    to the largest would cost over `max_padding` times the work of each sequence's own k.
    used: [B, chunks, rows per chunk] slots in use."""
    B = used.shape[0]
    per_chunk = used.amax(-1).float()  # [B, chunks]: each sequence's own work per chunk
    padded = B * per_chunk.amax(0).sum()
    own = per_chunk.sum()
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


def gather_blocks(q, kv, indices, *, block_size, query_block, qb0, qb1, shared_mask=False, slot_gate=None):
    """Gather the key blocks of query blocks [qb0, qb1) for SDPA.

    indices [B, nQB, K] (past blocks; the diagonal blocks are appended here).
    -> queries [B*C, H, Q, D], keys [B*C, 1, S, D], values (keys times the slot gates, if any),
    attention mask [B*C, 1, Q, S].
    With `shared_mask` (every slot valid) the mask is the same for all rows: [1, 1, Q, S], past
    blocks fully visible and the diagonal causal, which spares SDPA a per-row mask.
    """
    B, H, Lp, D = q.shape
    m = query_block // block_size
    blocks = with_diagonal_blocks(indices[:, qb0:qb1], m, qb0)  # [B, C, Kb]
    C, Kb = blocks.shape[1], blocks.shape[2]
    n_kb = kv.shape[1] // block_size
    # whole blocks are contiguous rows of [B * nKB, block_size * D]: index_select copies them at once
    rows = (blocks.clamp(min=0) + torch.arange(B, device=q.device)[:, None, None] * n_kb).reshape(-1)
    keys = kv.reshape(B * n_kb, block_size * D).index_select(0, rows).view(B * C, 1, Kb * block_size, D)
    values = keys
    if slot_gate is not None:
        gate = torch.cat([slot_gate[:, qb0:qb1], slot_gate.new_ones(B, C, m)], dim=-1)  # diagonal ungated
        values = keys * gate.repeat_interleave(block_size, dim=-1).view(B * C, 1, -1, 1)
    queries = q[:, :, qb0 * query_block : qb1 * query_block].reshape(B, H, C, query_block, D).transpose(1, 2)
    queries = queries.reshape(B * C, H, query_block, D)
    arange_q = torch.arange(query_block, device=q.device)
    if shared_mask:
        past = torch.ones(query_block, (Kb - m) * block_size, dtype=torch.bool, device=q.device)
        mask = torch.cat([past, arange_q[None, :] <= arange_q[:, None]], dim=1)
        return queries, keys, values, mask[None, None]
    key_pos = (blocks[..., None] * block_size + torch.arange(block_size, device=q.device)).view(B, C, -1)
    key_ok = (blocks >= 0)[..., None].expand(-1, -1, -1, block_size).reshape(B, C, -1)
    q_pos = torch.arange(qb0, qb1, device=q.device)[:, None] * query_block + arange_q
    mask = key_ok[:, :, None, :] & (key_pos[:, :, None, :] <= q_pos[None, :, :, None])
    return queries, keys, values, mask.view(B * C, 1, query_block, -1)


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


def torch_block_attention(q, kv, indices, *, scale, v_dim, block_size, query_block, slot_gate=None, chunk_size=16):
    """Block-sparse attention over gathered blocks with fused SDPA -> [B, H, L, v_dim].

    Sequences whose selections use widely different numbers of blocks are processed one by one, so
    each sequence's compute follows its own k.
    """
    B, H, L, D = q.shape
    n_qb, _, Lp = block_layout(L, block_size, query_block)
    if Lp > L:
        q, kv = F.pad(q, (0, 0, 0, Lp - L)), F.pad(kv, (0, 0, 0, Lp - L))
    used = (indices >= 0).sum(-1)  # [B, nQB]
    outs = []
    for rows_b in sequence_groups(used[..., None]):
        nb = q[rows_b].shape[0]
        chunks = []
        for qb0, qb1, slots in query_block_groups(used[rows_b].amax(0), chunk_size):
            trimmed = indices[rows_b, :, :slots]
            gate = None if slot_gate is None else slot_gate[rows_b, :, :slots]
            queries, keys, values, mask = gather_blocks(
                q[rows_b],
                kv[rows_b],
                trimmed,
                block_size=block_size,
                query_block=query_block,
                qb0=qb0,
                qb1=qb1,
                shared_mask=bool((trimmed[:, qb0:qb1] >= 0).all()),
                slot_gate=gate,
            )
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
            chunks.append(o.view(nb, qb1 - qb0, H, query_block, D))
        # [b, nQB, H, Q, D] -> [b, H, Lp, D] with a single copy
        outs.append(torch.cat(chunks, dim=1).transpose(1, 2).reshape(nb, H, n_qb * query_block, D))
    out = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]
    return out[:, :, :L, :v_dim]


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
    slot_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, H, L, D], kv [B, L, D], indices (see module doc) -> (out [B, H, L, v_dim], slot probs)

    `slot_gate` ([B, R, K], same shape as indices) multiplies each slot's attention weight; it is
    exactly 1 in the forward pass of the soft rank mask and only carries gradient to the budget.
    Token mode also returns the head-averaged attention probabilities of each selected slot
    ([B, L, K], detached; the indexer's KL target), block mode None.
    """
    backend = resolve_backend(backend, q.device, block_size)
    layout = dict(block_size=block_size, query_block=query_block)
    if backend == "triton":
        from adaptive_attn.ops.triton_sparse import triton_token_attention

        return triton_token_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_gate=slot_gate)
    if backend == "flex" and slot_gate is None:  # FlexAttention cannot weight probabilities after softmax
        from adaptive_attn.ops.flex_sparse import flex_block_attention

        return flex_block_attention(q, kv, indices, scale=scale, v_dim=v_dim, **layout), None
    if backend == "reference":
        return reference_sparse_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_gate=slot_gate, **layout)
    if block_size == 1:
        return torch_token_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_gate=slot_gate)
    return torch_block_attention(q, kv, indices, scale=scale, v_dim=v_dim, slot_gate=slot_gate, **layout), None
