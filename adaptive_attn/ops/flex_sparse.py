"""Block-sparse attention through PyTorch FlexAttention (the GPU block path).

The `BlockMask` is built directly from the selected block indices: per query block, the selected
earlier key blocks are *full* blocks (no mask evaluated) and the query block's own diagonal blocks are
*partial* blocks with a causal mask. Heads share one selection (MQA: one key/value head). On CUDA the
kernel is compiled and has a fused backward; on CPU (torch 2.13) FlexAttention runs its eager forward
only, which the tests use to check the mask against the reference.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def selection_block_mask(indices: torch.Tensor, seq_len: int, block_size: int, query_block: int) -> BlockMask:
    """indices [B, nQB, K] (earlier key blocks, -1 = unused, valid first) -> BlockMask over the padded length."""
    B, n_qb, _ = indices.shape
    m = query_block // block_size
    padded = n_qb * query_block
    n_kb = n_qb * m  # BlockMask index tables hold one column per key block
    full_num = (indices >= 0).sum(-1, dtype=torch.int32)[:, None]  # [B, 1, nQB]
    full_idx = F.pad(indices.clamp(min=0), (0, n_kb - indices.shape[-1])).to(torch.int32)[:, None].contiguous()
    diag = torch.arange(n_qb, device=indices.device)[:, None] * m + torch.arange(m, device=indices.device)
    part_idx = F.pad(diag, (0, n_kb - m)).to(torch.int32).expand(B, 1, n_qb, n_kb).contiguous()
    part_num = torch.full((B, 1, n_qb), m, dtype=torch.int32, device=indices.device)
    # the mask_mod repeats the selection: eager (CPU) FlexAttention evaluates it on every pair
    # instead of skipping unselected blocks
    chosen = torch.zeros(B, n_qb, n_kb + 1, dtype=torch.bool, device=indices.device)
    chosen.scatter_(-1, indices.masked_fill(indices < 0, n_kb), True)
    chosen = chosen[..., :n_kb] | (
        torch.arange(n_kb, device=indices.device)[None, :] // m == torch.arange(n_qb, device=indices.device)[:, None]
    )

    def selected_and_causal(b, h, q_idx, kv_idx):
        return chosen[b, q_idx // query_block, kv_idx // block_size] & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(query_block, block_size),
        mask_mod=selected_and_causal,
        seq_lengths=(padded, padded),
    )


def flex_block_attention(q, kv, indices, *, scale, v_dim, block_size, query_block) -> torch.Tensor:
    """q [B, H, L, D], kv [B, L, D], indices [B, nQB, K] -> [B, H, L, v_dim]"""
    B, H, L, D = q.shape
    padded = indices.shape[1] * query_block
    q = F.pad(q, (0, 0, 0, padded - L))
    kv = F.pad(kv, (0, 0, 0, padded - L))[:, None]
    attend = _compiled_flex() if q.is_cuda else flex_attention
    block_mask = selection_block_mask(indices, L, block_size, query_block)
    out = attend(q, kv, kv, block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[:, :, :L, :v_dim]
