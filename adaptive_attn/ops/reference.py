"""The reference backend: dense scores plus a mask built from the selection. O(L^2); the oracle of the tests."""

import torch

from adaptive_attn.ops.layout import SparseLayout


def reference_attention(q, latents, indices, layout: SparseLayout, *, scale, v_dim, slot_bias=None, biased_rows=None):
    """q [B, H, L, D], latents [B, L, D] -> (out [B, H, L, v_dim], slot probabilities [B, L, K] or None)"""
    mask = layout.selection_mask(indices)
    scores = torch.einsum("bhld,bsd->bhls", q, latents) * scale
    if slot_bias is not None:
        scores = scores + layout.per_key(layout.scatter_slots(slot_bias, indices, 0.0))[:, None]
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhls,bsv->bhlv", probs, latents[..., :v_dim])
    if not layout.token_level:
        return out, None
    slot_probs = probs.detach().mean(1).gather(-1, indices.clamp(min=0)) * (indices >= 0)
    return out, slot_probs
