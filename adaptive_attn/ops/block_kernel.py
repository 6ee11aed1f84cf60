"""The `cpu` backend's kernel: block-sparse attention over gathered key rows, forward and backward in C++
(`csrc/block_attention.cpp`), built for this machine on first use and cached by torch's extension loader.

Where SDPA takes the rows of the torch block backend, this kernel takes the same rows with less work: the
values' products run over their `v_dim` columns instead of the key width, the slots after a row's last used
one and the diagonal keys no query of a tile sees are skipped rather than masked, and each key block's mass
and the slot bias's gradient come out of the probabilities it already holds. Threads split the query rows;
BLAS does the products. Its whole-past prefix takes no slot bias, so in the `cpu` backend a biased query
block ends the prefix and its rows take the kernel's grouped calls.
"""

import functools
import pathlib
import warnings

import torch

SOURCE = pathlib.Path(__file__).parent / "csrc" / "block_attention.cpp"
CAPABILITY_FLAGS = {  # ATen's vector types take the widest instructions the CPU has, as torch's own kernels do
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
}
DTYPES = (torch.float32, torch.float64)


@functools.cache
def kernel():
    """The built extension, or None (with one warning) where it cannot be built or loaded here."""
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *CAPABILITY_FLAGS.get(capability, [])]
    try:
        return load(
            f"adaptive_attn_block_{capability.lower().replace(' ', '_')}",
            [str(SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, or a BLAS without sgemm_: the torch backend runs instead
        message = f"the cpu backend's kernel is unavailable ({error}); block mode runs the torch backend"
        warnings.warn(message, stacklevel=2)
        return None


def takes(q: torch.Tensor) -> bool:
    """Whether the kernel takes these queries: on a CPU, in float32 or float64, once it has built."""
    return q.device.type == "cpu" and q.dtype in DTYPES and kernel() is not None


class BlockAttention(torch.autograd.Function):
    """q [n, M, D] (M = Q * heads query rows, a query's heads consecutive), keys [n, S, D], slot bias [n, w] or
    None, used slots [n, w] (bool) or None (all) -> (out [n, M, v_dim], each key block's mass per query row
    [n, M, S / block_size], detached). Each row's keys are w slots of block_size keys, then its diagonal keys,
    of which query i sees the first i + 1."""

    @staticmethod
    def forward(ctx, q, keys, bias, used, heads: int, slots: int, block_size: int, v_dim: int, scale: float):
        q, keys = q.contiguous(), keys.contiguous()
        bias = None if bias is None else bias.contiguous()
        used = None if used is None else used.contiguous()
        out, lse, mass = kernel().forward(q, keys, bias, used, v_dim, heads, slots, block_size, scale)
        ctx.save_for_backward(q, keys, bias, used, out, lse)
        ctx.geometry = (heads, slots, block_size, scale)
        ctx.mark_non_differentiable(mass)
        return out, mass

    @staticmethod
    def backward(ctx, grad_out, _):
        q, keys, bias, used, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_keys, grad_bias = kernel().backward(q, keys, bias, used, out, lse, grad_out, *ctx.geometry)
        return grad_q, grad_keys, grad_bias if bias is not None else None, None, None, None, None, None, None


def block_attention(q, keys, used, slot_bias, slots: int, block_size: int, scale: float, v_dim: int):
    """q [n, Q, H, D] over keys [n, S, D]: `slots` selected blocks (`SparseLayout.gather_blocks`), then the
    diagonal keys; used and slot_bias [n, slots] or None -> (out [n, Q, H, v_dim], each key block's mass per
    query and head [n, Q, H, S / block_size])"""
    n, Q, H, D = q.shape
    out, mass = BlockAttention.apply(q.reshape(n, Q * H, D), keys, slot_bias, used, H, slots, block_size, v_dim, scale)
    return out.view(n, Q, H, v_dim), mass.view(n, Q, H, -1)
