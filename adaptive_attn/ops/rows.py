"""Moving rows of the torch backends' inputs and outputs with backward passes that cost no more than the
forward: the per-call overhead of autograd's defaults (a full-size zero gradient, a scatter-add) is large
on small CPUs, and the backends split, join and reorder rows on every call."""

import torch


def split(x: torch.Tensor, sizes: list[int], dim: int = 0):
    """`x.split(sizes, dim)`, but x itself when there is one part: the backward of a split is a
    concatenation, a full copy even of a single part."""
    return [x] if len(sizes) == 1 else x.split(sizes, dim)


def concat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat(parts, dim)`, but the part itself when there is one (a concatenation copies it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class PermutedRows(torch.autograd.Function):
    """x [N, ...], a permutation `order` [N] and its inverse -> x[order]. Its backward gathers the gradient by the
    inverse; index_select's would zero a gradient of x's size and scatter-add into it, about three times the
    gather's cost on a two-core CPU."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] along dim 0, for a permutation `order` whose inverse is `inverse` (see `PermutedRows`)."""
    return PermutedRows.apply(x, order, inverse) if x.requires_grad else x.index_select(0, order)
