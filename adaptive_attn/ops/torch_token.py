"""The torch token backend: gathers only each query's selected latent rows, so compute follows k."""

import torch
import torch.nn.functional as F

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.rows import permute_rows, split
from adaptive_attn.ops.torch_block import slot_widths

SLOT_TILE = 8  # a query's slots round up to a multiple of at least this (small: k = 65 gathers 72)
GATHER_MAX = 2**20  # elements one gather takes at most (several chunks): few scatter-adds in backward, gathers in cache


def width_chunks(widths: torch.Tensor, max_chunk: int, row_size: int) -> list[tuple[int, int, int]]:
    """Ascending per-query widths [N] -> [(c0, c1, width)]: runs of equal width, cut so that a chunk's
    gathered elements (queries x width x row_size) stay within `max_chunk`."""
    chunks, c0 = [], 0
    values, counts = torch.unique_consecutive(widths, return_counts=True)
    for width, count in zip(values.tolist(), counts.tolist()):
        step = max(16, max_chunk // (width * row_size))
        chunks += [(c, min(c + step, c0 + count), width) for c in range(c0, c0 + count, step)]
        c0 += count
    return chunks


def gather_groups(slots: list[torch.Tensor], max_rows: int) -> list[list[torch.Tensor]]:
    """Consecutive chunks' slots [C, n], grouped so that a group gathers at most `max_rows` rows (or one chunk):
    one gather per group, since the backward of a gather (a scatter-add) has a large fixed cost on a CPU."""
    groups, rows = [], max_rows
    for idx in slots:
        if rows + idx.numel() > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(idx)
        rows += idx.numel()
    return groups


def gathered_keys(flat_latents: torch.Tensor, slots: list[torch.Tensor]) -> list[torch.Tensor]:
    """Latent rows [N, D] at each chunk's slots [C, n] (-1 reads row 0, masked later) -> [C, n, D] per chunk."""
    keys = flat_latents.index_select(0, torch.cat([idx.flatten() for idx in slots]).clamp(min=0))
    return [k.view(*idx.shape, -1) for k, idx in zip(split(keys, [idx.numel() for idx in slots]), slots)]


class GatheredAttention(torch.autograd.Function):
    """Attention of each query's heads over its own gathered keys, which are its values too (MLA's latents):
    q [C, H, D] (scaled), keys [C, n, D], bias [C, 1, n], empty slots [C, n] -> (out [C, H, v_dim], probs
    [C, H, n], no gradient). The keys' gradient from both their uses comes out of one product
    ([C, n, 2H] x [C, 2H, D]); autograd would add two rank-H products, one of them transposed, and that
    sum alone cost more than either product on a CPU."""

    @staticmethod
    def forward(ctx, q, keys, bias, empty, v_dim: int):
        probs = torch.baddbmm(bias, q, keys.transpose(1, 2)).masked_fill(empty[:, None], float("-inf")).softmax(-1)
        # values are the keys' first v_dim columns; slicing the output is cheaper than slicing the keys
        out = torch.bmm(probs, keys)[..., :v_dim]
        ctx.save_for_backward(q, keys, probs)
        ctx.mark_non_differentiable(probs)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, _):
        q, keys, probs = ctx.saved_tensors
        dtype = torch.promote_types(torch.promote_types(q.dtype, keys.dtype), grad_out.dtype)  # autocast mixes them
        q, keys, probs, grad_out = q.to(dtype), keys.to(dtype), probs.to(dtype), grad_out.to(dtype)
        grad_probs = torch.bmm(grad_out, keys[..., : grad_out.shape[-1]].transpose(1, 2))  # [C, H, n]
        grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_q = torch.bmm(grad_logits, keys)
        grad_out = F.pad(grad_out, (0, keys.shape[-1] - grad_out.shape[-1]))
        grad_keys = torch.bmm(torch.cat([grad_logits, probs], 1).transpose(1, 2), torch.cat([q, grad_out], 1))
        grad_bias = grad_logits.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_q, grad_keys, grad_bias, None, None


def torch_token_attention(
    q, latents, indices, layout: SparseLayout, *, scale, v_dim, slot_bias=None, biased_rows=None, max_chunk=2**22
):
    """q [B, H, L, D], latents [B, L, D], indices [B, L, K] -> (out [B, H, L, v_dim], slot probs [B, L, K]).

    Each query gathers its used slots rounded up to its width (`slot_widths`: a multiple of `SLOT_TILE`, and
    from 128 slots on at most 1/8 more, so that long rows take few widths), so its arithmetic, and with it
    every bit of its output, depends on its own selection alone, never on how many slots other queries
    use. Queries are processed in order of width, in chunks of one width: compute follows each query's own
    k, not the batch maximum. A chunk takes as many queries as keep its gathered elements within
    `max_chunk`: few, large calls (each call has a fixed cost, large on small CPUs), yet gathers that stay
    in cache when k is large; consecutive small chunks share one gather (`GATHER_MAX`).
    """
    B, H, L, D = q.shape
    K = indices.shape[-1]
    pad = int(slot_widths(torch.tensor(K), SLOT_TILE)) - K  # room for every query's width
    entries = F.pad(indices, (0, pad), value=-1)
    entries = (entries + torch.arange(B, device=q.device)[:, None, None] * L).masked_fill(entries < 0, -1)
    widths = slot_widths((indices >= 0).sum(-1).flatten().clamp(min=1), SLOT_TILE)  # [B*L]
    order = widths.argsort(stable=True)
    inverse = torch.argsort(order)
    entries = entries.view(B * L, K + pad)[order]  # slot -1 reads entry 0 and is masked
    # scaled here, not by baddbmm's alpha, whose backward scales the larger gradient of the gathered keys
    q_sorted = permute_rows(q.transpose(1, 2).reshape(B * L, H, D), order, inverse) * scale
    # one bias per slot, shared by the heads ([N, 1, K]); zeros cost nothing extra inside baddbmm
    bias = q.new_zeros(B * L, 1, K + pad)
    if slot_bias is not None:
        bias = permute_rows(F.pad(slot_bias.to(q.dtype), (0, pad)).reshape(B * L, 1, K + pad), order, inverse)
    flat_latents = latents.reshape(B * L, -1)
    slot_probs = q.new_zeros(B * L, K + pad)
    chunks, spans = [], width_chunks(widths[order], max_chunk, D)
    sizes = [c1 - c0 for c0, c1, _ in spans]  # split, not slices: a slice's backward writes a full-size gradient
    slots = [entries[c0:c1, :n] for c0, c1, n in spans]
    all_keys = (keys for part in gather_groups(slots, GATHER_MAX // D) for keys in gathered_keys(flat_latents, part))
    for (c0, c1, n), idx, keys, q_chunk, bias_chunk in zip(
        spans, slots, all_keys, q_sorted.split(sizes), bias.split(sizes)
    ):
        out, probs = GatheredAttention.apply(q_chunk, keys, bias_chunk[..., :n], idx < 0, v_dim)
        slot_probs[order[c0:c1], :n] = probs.mean(1).to(slot_probs.dtype)  # autocast: probs may be bf16
        chunks.append(out)
    out = permute_rows(torch.cat(chunks), inverse, order)  # back to [B*L] order
    return out.view(B, L, H, v_dim).transpose(1, 2), slot_probs[:, :K].view(B, L, K)
