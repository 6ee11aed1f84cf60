"""The adaptive budget's rank mask in the torch block backend: a slot bias b_j that is 0 in value and
needs only its gradient, dL/db_j = sum over the row's (query, head) pairs i of dO_i . W_ij - (dO_i . O_i) m_ij,
where W_ij = sum over block j's keys s of p_is v_s is the part of O_i that block j's values make, and m_ij
the block's mass.

The first term is sum over s in block j of v_s . dV_s, where dV_s = sum_i p_is dO_i is the values' gradient
that SDPA's backward computes anyway; the second needs dO, O and the masses, which the block indicators put
in SDPA's output. Two taps, identities in the forward pass (the bias is 0, so the outputs are the unbiased
call's, bit for bit), add both terms to the bias's gradient in the backward pass: `ValueTap` on the values,
`MassTap` on the output. Scaling the values by 1 + b_j and subtracting O_i sum_j b_j m_ij would give the
same gradient through autograd, at the price of a scaled copy of the values and a correction product in
every forward pass and their backward.
"""

import torch


class ValueTap(torch.autograd.Function):
    """values [n, 1, S, v] (S = J * block_size keys) and the bias [n, J] -> the values as they are; backward adds
    sum over block j's keys of v_s . dV_s to the bias's gradient."""

    @staticmethod
    def forward(ctx, values, bias, block_size: int):
        ctx.save_for_backward(values)
        ctx.block_size, ctx.bias_dtype = block_size, bias.dtype
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        (values,) = ctx.saved_tensors
        per_key = torch.linalg.vecdot(grad, values).sum(1)  # [n, S]
        grad_bias = per_key.view(per_key.shape[0], -1, ctx.block_size).sum(-1)
        return grad, grad_bias.to(ctx.bias_dtype), None


class MassTap(torch.autograd.Function):
    """out [n, Q, H, v], each key block's mass [n, Q, H, J] (detached) and the bias [n, J] -> out as it is;
    backward adds -sum over (query, head) of (dO . O) m_j to the bias's gradient."""

    @staticmethod
    def forward(ctx, out, mass, bias):
        ctx.save_for_backward(out, mass)
        ctx.bias_dtype = bias.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        out, mass = ctx.saved_tensors
        weight = torch.linalg.vecdot(grad, out)[..., None]  # [n, Q, H, 1]
        return grad, None, -(weight * mass).sum((1, 2)).to(ctx.bias_dtype)
