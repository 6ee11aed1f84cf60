"""The flex block backend: PyTorch FlexAttention with a BlockMask built from the selection (the GPU block path).

Per query block, the selected earlier key blocks are *full* blocks (no mask evaluated) and the query
block's own diagonal blocks are *partial* blocks with a causal mask. Heads share one selection (MQA: one
key/value head). On CUDA the kernel is compiled and has a fused backward; on CPU (torch 2.13)
FlexAttention runs its eager forward only, which the tests use to check the mask against the reference.
"""

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from adaptive_attn.ops.layout import SparseLayout


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def selection_block_mask(indices: torch.Tensor, layout: SparseLayout) -> BlockMask:
    """indices [B, nQB, K] (earlier key blocks, -1 = unused, valid first) -> BlockMask over the padded length."""
    B, n_qb, _ = indices.shape
    m, n_kb, qb, bs = layout.blocks_per_query_block, layout.n_columns, layout.query_block, layout.block_size
    full_num = (indices >= 0).sum(-1, dtype=torch.int32)[:, None]  # [B, 1, nQB]
    full_idx = F.pad(indices.clamp(min=0), (0, n_kb - indices.shape[-1])).to(torch.int32)[:, None].contiguous()
    diagonal = torch.arange(n_qb, device=indices.device)[:, None] * m + torch.arange(m, device=indices.device)
    part_idx = F.pad(diagonal, (0, n_kb - m)).to(torch.int32).expand(B, 1, n_qb, n_kb).contiguous()
    part_num = torch.full((B, 1, n_qb), m, dtype=torch.int32, device=indices.device)
    # the mask_mod repeats the selection: eager (CPU) FlexAttention evaluates it on every pair
    # instead of skipping unselected blocks
    chosen = layout.scatter_slots(torch.ones_like(indices, dtype=torch.bool), indices, False)
    chosen = chosen | (torch.arange(n_kb, device=indices.device)[None, :] // m == layout.row_positions[:, None] // qb)

    def selected_and_causal(b, h, q_idx, kv_idx):
        return chosen[b, q_idx // qb, kv_idx // bs] & (q_idx >= kv_idx)

    return BlockMask.from_kv_blocks(
        part_num,
        part_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(qb, bs),
        mask_mod=selected_and_causal,
        seq_lengths=(layout.padded_len, layout.padded_len),
    )


def flex_block_attention(q, latents, indices, layout: SparseLayout, *, scale, v_dim, slot_bias=None, biased_rows=None):
    """q [B, H, L, D], latents [B, L, D], indices [B, nQB, K] -> (out [B, H, L, v_dim], None).
    FlexAttention takes no slot bias: the dispatcher sends biased calls to the torch backend."""
    if slot_bias is not None:
        raise ValueError("the flex backend takes no slot bias (the dispatcher sends such calls to torch)")
    L = q.shape[2]
    q = layout.pad(q, 2)
    latents = layout.pad(latents, 1)[:, None]
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(q, latents, latents, block_mask=selection_block_mask(indices, layout), scale=scale, enable_gqa=True)
    return out[:, :, :L, :v_dim], None
