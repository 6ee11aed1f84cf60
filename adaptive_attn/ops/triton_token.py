"""Fused token-level sparse attention in Triton (MLA "MQA mode"), forward and backward.

One program per (query t, sequence b) handles all heads of that query (heads are the rows of the
tiles, as in FlashMLA's sparse kernels): it walks the query's selected slots in tiles of BLOCK_K,
gathers the shared latent rows straight from `kv` (no [L, k, d] gather is materialised), and keeps an
online softmax. Only the first `lengths[b, t]` slots are visited (valid slots come first; -1 slots are
skipped), so compute follows each query's own k. The backward pass recomputes the probabilities from
the saved log-sum-exp and scatters key/value gradients with atomic adds (several queries share rows).
An optional per-slot logit bias (the soft rank mask of the adaptive budget) is added to each slot's
logit and receives its gradient (the logits' gradient summed over heads). Float32 inputs are multiplied
in full float32 ("ieee"), as PyTorch's float32 matmuls are by default, not in Triton's default TF32.

Runs on CUDA; on CPU under TRITON_INTERPRET=1 (the tests).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _load_tile(
    KV,
    IDX,
    LENS,
    b,
    t,
    k0,
    s_kb,
    s_ks,
    s_ib,
    s_il,
    s_lb,
    s_ll,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    kk = k0 + tl.arange(0, BLOCK_K)
    n = tl.load(LENS + b * s_lb + t * s_ll)
    idx = tl.load(IDX + b * s_ib + t * s_il + kk, mask=kk < n, other=-1)
    valid = idx >= 0
    d = tl.arange(0, BLOCK_D)
    rows = tl.load(
        KV + b * s_kb + tl.maximum(idx, 0)[:, None] * s_ks + d[None, :],
        mask=valid[:, None] & (d[None, :] < D),
        other=0.0,
    )
    return kk, idx, valid, rows


@triton.jit
def _head_block(
    PTR, b, t, s_b, s_h, s_l, H: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Pointers and mask of all heads' rows of query t in sequence b: a [BLOCK_H, BLOCK_D] tile."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    return PTR + b * s_b + h[:, None] * s_h + t * s_l + d[None, :], (h[:, None] < H) & (d[None, :] < WIDTH)


@triton.jit
def _sparse_fwd(
    Q,
    KV,
    IDX,
    LENS,
    BIAS,
    OUT,
    LSE,
    scale,
    s_qb,
    s_qh,
    s_ql,
    s_kb,
    s_ks,
    s_ib,
    s_il,
    s_lb,
    s_ll,
    s_ob,
    s_oh,
    s_ol,
    s_mb,
    s_mh,
    H: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t, b = tl.program_id(0), tl.program_id(1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    q_ptrs, q_mask = _head_block(Q, b, t, s_qb, s_qh, s_ql, H, D, BLOCK_H, BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    n = tl.load(LENS + b * s_lb + t * s_ll)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, n, BLOCK_K):
        kk, idx, valid, rows = _load_tile(
            KV, IDX, LENS, b, t, k0, s_kb, s_ks, s_ib, s_il, s_lb, s_ll, D, BLOCK_D, BLOCK_K
        )
        s = tl.dot(q, tl.trans(rows), input_precision="ieee").to(tl.float32) * scale
        if HAS_BIAS:
            s += tl.load(BIAS + b * s_ib + t * s_il + kk, mask=valid, other=0.0).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        values = tl.where(d[None, :] < DV, rows, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(rows.dtype), values, input_precision="ieee").to(tl.float32)
        m_i = m_new
    acc = acc / l_i[:, None]
    out_ptrs, out_mask = _head_block(OUT, b, t, s_ob, s_oh, s_ol, H, DV, BLOCK_H, BLOCK_D)
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=out_mask)
    tl.store(LSE + b * s_mb + h * s_mh + t, m_i + tl.log(l_i), mask=h < H)


@triton.jit
def _sparse_bwd(
    Q,
    KV,
    IDX,
    LENS,
    BIAS,
    DO,
    LSE,
    DELTA,
    DQ,
    DKV,
    DBIAS,
    SLOT_P,
    scale,
    s_qb,
    s_qh,
    s_ql,
    s_kb,
    s_ks,
    s_ib,
    s_il,
    s_lb,
    s_ll,
    s_ob,
    s_oh,
    s_ol,
    s_mb,
    s_mh,
    H: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GRADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """GRADS: dq, dkv (atomic) and dbias; otherwise only the head-averaged slot probabilities."""
    t, b = tl.program_id(0), tl.program_id(1)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < H
    q_ptrs, q_mask = _head_block(Q, b, t, s_qb, s_qh, s_ql, H, D, BLOCK_H, BLOCK_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    lse = tl.load(LSE + b * s_mb + h * s_mh + t, mask=hmask, other=0.0)
    n = tl.load(LENS + b * s_lb + t * s_ll)
    if GRADS:
        do_ptrs, do_mask = _head_block(DO, b, t, s_ob, s_oh, s_ol, H, DV, BLOCK_H, BLOCK_D)
        do = tl.load(do_ptrs, mask=do_mask, other=0.0)
        delta = tl.load(DELTA + b * s_mb + h * s_mh + t, mask=hmask, other=0.0)
        dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for k0 in range(0, n, BLOCK_K):
        kk, idx, valid, rows = _load_tile(
            KV, IDX, LENS, b, t, k0, s_kb, s_ks, s_ib, s_il, s_lb, s_ll, D, BLOCK_D, BLOCK_K
        )
        s = tl.dot(q, tl.trans(rows), input_precision="ieee").to(tl.float32) * scale
        if HAS_BIAS:
            s += tl.load(BIAS + b * s_ib + t * s_il + kk, mask=valid, other=0.0).to(tl.float32)[None, :]
        p = tl.where(valid[None, :] & hmask[:, None], tl.exp(s - lse[:, None]), 0.0)
        if GRADS:
            values = tl.where(d[None, :] < DV, rows, 0.0)
            dp = tl.dot(do, tl.trans(values), input_precision="ieee").to(tl.float32)  # dO . v_j
            ds = p * (dp - delta[:, None])
            if HAS_BIAS:
                tl.store(DBIAS + b * s_ib + t * s_il + kk, tl.sum(ds, 0), mask=valid)
            dq += tl.dot(ds.to(rows.dtype), rows, input_precision="ieee").to(tl.float32) * scale
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee").to(tl.float32) * scale
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee").to(tl.float32)
            ptrs = DKV + b * s_kb + tl.maximum(idx, 0)[:, None] * s_ks + d[None, :]
            tl.atomic_add(ptrs, dk + dv, mask=valid[:, None] & (d[None, :] < D))
        else:
            tl.store(SLOT_P + b * s_ib + t * s_il + kk, tl.sum(p, 0) / H, mask=kk < n)
    if GRADS:
        dq_ptrs, _ = _head_block(DQ, b, t, s_qb, s_qh, s_ql, H, D, BLOCK_H, BLOCK_D)  # dq has q's layout
        tl.store(dq_ptrs, dq, mask=q_mask)


def _launch_args(q, kv, idx, lengths, out_like, lse):
    return (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kv.stride(0),
        kv.stride(1),
        idx.stride(0),
        idx.stride(1),
        lengths.stride(0),
        lengths.stride(1),
        out_like.stride(0),
        out_like.stride(1),
        out_like.stride(2),
        lse.stride(0),
        lse.stride(1),
    )


def _meta(q, kv, v_dim, block_k):
    H, D = q.shape[1], q.shape[-1]
    return dict(
        H=H,
        D=D,
        DV=v_dim,
        BLOCK_H=max(16, triton.next_power_of_2(H)),
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_K=block_k,
    )


class TritonSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, bias, scale: float, v_dim: int, block_k: int):
        B, H, L, D = q.shape
        q, kv = q.contiguous(), kv.contiguous()
        idx = indices.to(torch.int32).contiguous()
        lengths = (indices >= 0).sum(-1).to(torch.int32).contiguous()
        # the output keeps D columns (values are the first v_dim; the rest stay zero) so that every
        # pointer shares one layout; sliced below
        out = torch.zeros(B, H, L, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
        has_bias = bias is not None
        bias_arg = bias.contiguous().float() if has_bias else idx
        _sparse_fwd[(L, B)](
            q,
            kv,
            idx,
            lengths,
            bias_arg,
            out,
            lse,
            scale,
            *_launch_args(q, kv, idx, lengths, out, lse),
            HAS_BIAS=has_bias,
            **_meta(q, kv, v_dim, block_k),
        )
        slot_p = torch.zeros(idx.shape, device=q.device, dtype=torch.float32)
        _sparse_bwd[(L, B)](
            q,
            kv,
            idx,
            lengths,
            bias_arg,
            out,
            lse,
            lse,
            q,
            kv,
            slot_p,
            slot_p,
            scale,
            *_launch_args(q, kv, idx, lengths, out, lse),
            HAS_BIAS=has_bias,
            GRADS=False,
            **_meta(q, kv, v_dim, block_k),
        )
        ctx.save_for_backward(q, kv, idx, lengths, bias_arg, out, lse)
        ctx.scale, ctx.v_dim, ctx.block_k, ctx.has_bias = scale, v_dim, block_k, has_bias
        ctx.mark_non_differentiable(slot_p)
        return out[..., :v_dim], slot_p

    @staticmethod
    def backward(ctx, dout, _):
        q, kv, idx, lengths, bias_arg, out, lse = ctx.saved_tensors
        do = torch.zeros_like(out)
        do[..., : ctx.v_dim] = dout
        delta = (do.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
        dkv = torch.zeros(kv.shape, device=kv.device, dtype=torch.float32)
        dbias = torch.zeros(idx.shape, device=q.device, dtype=torch.float32)
        _sparse_bwd[(q.shape[2], q.shape[0])](
            q,
            kv,
            idx,
            lengths,
            bias_arg,
            do,
            lse,
            delta,
            dq,
            dkv,
            dbias,
            dbias,
            ctx.scale,
            *_launch_args(q, kv, idx, lengths, do, lse),
            HAS_BIAS=ctx.has_bias,
            GRADS=True,
            **_meta(q, kv, ctx.v_dim, ctx.block_k),
        )
        return dq.to(q.dtype), dkv.to(kv.dtype), None, dbias if ctx.has_bias else None, None, None, None


def triton_token_attention(
    q, latents, indices, layout=None, *, scale, v_dim, slot_bias=None, biased_rows=None, block_k: int = 32
):
    """q [B, H, L, D], latents [B, S, D], indices [B, L, K] (-1 = unused, valid first; token layout)
    -> (out [B, H, L, v_dim], head-averaged slot probabilities [B, L, K])"""
    return TritonSparseAttention.apply(q, latents, indices, slot_bias, scale, v_dim, block_k)
