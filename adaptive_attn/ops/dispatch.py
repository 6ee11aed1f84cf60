"""Sparse attention over shared latent rows (MLA "MQA mode"): one math, several backends.

All heads of a query attend the same selected latent rows; the values are the first `v_dim` columns of
those rows. The selection is `indices [B, R, K]` over the columns of a `SparseLayout` (-1 = unused).

Backends, each in its own module, tested equal to `reference`:
- `reference`: dense scores plus a mask built from the selection; O(L^2), the oracle for tests.
- `torch`: gathers only the selected rows (token mode) or key blocks (block mode, fused SDPA).
- `triton` (token mode): a fused kernel, forward and backward, for GPUs.
- `cpu` (block mode): the torch backend's rows, each call in a C++ kernel built on first use
  (`block_kernel`), which multiplies the values over their own columns and skips masked keys; `torch`
  where it cannot build or take the dtype.
- `flex` (block mode): FlexAttention with a BlockMask built from the selection; compiled with a fused
  backward on CUDA, eager forward only on CPU. Calls with a slot bias (the adaptive budget's soft rank
  mask, which needs its gradient) go to `torch`, with one warning.
- `auto`: on CUDA `triton` for tokens and `flex` for blocks (in multiples of 16 tokens, FlexAttention's
  smallest tile); on a CPU `cpu` for blocks; `torch` otherwise.
Every backend is called as `fn(q, latents, indices, layout, scale=, v_dim=, slot_bias=, biased_rows=)` and
returns (out [B, H, L, v_dim], the indexer KL's target or None): in token mode the head-averaged slot
probabilities [B, L, K]; in block mode (torch) each selected block's attention mass [B, R, K], NaN in rows
it had no room for.
`biased_rows` [R] marks the rows whose slot bias carries a gradient (the others' is zero in value and
gradient); a backend may use it to skip work, never to change the result.
"""

import functools
import importlib
import importlib.util
import warnings
from collections.abc import Callable

import torch

from adaptive_attn.ops.layout import SparseLayout

BACKENDS = ("reference", "torch", "cpu", "triton", "flex", "auto")
FLEX_TILE = 16  # FlexAttention's compiled kernels tile by at least 16 queries and keys
_FUNCTIONS = {
    ("reference", True): "reference:reference_attention",
    ("reference", False): "reference:reference_attention",
    ("torch", True): "torch_token:torch_token_attention",
    ("torch", False): "torch_block:torch_block_attention",
    ("cpu", False): "torch_block:torch_block_attention",
    ("triton", True): "triton_token:triton_token_attention",
    ("flex", False): "flex_block:flex_block_attention",
}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def flex_fits(block_size: int, query_block: int) -> bool:
    """Whether FlexAttention takes these blocks: key and query blocks in whole tiles."""
    return block_size > 1 and block_size % FLEX_TILE == 0 and query_block % FLEX_TILE == 0


def check_backend(backend: str, block_size: int, query_block: int) -> None:
    """The backend rule of `model.sparse`; ValueError naming the key."""
    if backend not in BACKENDS:
        raise ValueError(f"model.sparse.backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and block_size > 1 or backend in ("flex", "cpu") and block_size == 1:
        raise ValueError(
            f"model.sparse.backend={backend} does not fit model.sparse.block_size={block_size}: "
            "triton is token-level (block_size=1), flex and cpu are block-level (block_size > 1)"
        )
    if backend == "flex" and not flex_fits(block_size, query_block):
        raise ValueError(
            f"model.sparse.backend=flex does not fit model.sparse.block_size={block_size}, "
            f"query_block={query_block}: FlexAttention needs multiples of {FLEX_TILE}"
        )


def resolve_backend(backend: str, device: torch.device, block_size: int = 1, query_block: int | None = None) -> str:
    """`auto` -> on CUDA the fused kernels (Triton for tokens, FlexAttention for blocks that fit its tiles),
    elsewhere the CPU kernel for blocks and `torch` for tokens; any other backend as it is, once its rule holds."""
    query_block = block_size if query_block is None else query_block
    check_backend(backend, block_size, query_block)
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "cpu" if block_size > 1 else "torch"
    if block_size > 1:
        return "flex" if flex_fits(block_size, query_block) else "torch"
    return "triton" if triton_available() else "torch"


def backend_function(backend: str, device: torch.device, block_size: int, query_block: int) -> Callable:
    """The backend's attention function, resolved once (a layer keeps it per device)."""
    name = resolve_backend(backend, device, block_size, query_block)
    module, function = _FUNCTIONS[name, block_size == 1].split(":")
    fn = getattr(importlib.import_module(f"adaptive_attn.ops.{module}"), function)
    if name == "cpu":
        return functools.partial(fn, fused=True)
    return _flex_unless_biased(fn) if name == "flex" else fn


def _flex_unless_biased(flex_fn: Callable) -> Callable:
    torch_fn = backend_function("torch", torch.device("cpu"), 2, 2)

    def attend(q, latents, indices, layout, *, scale, v_dim, slot_bias=None, biased_rows=None):
        if slot_bias is None:
            return flex_fn(q, latents, indices, layout, scale=scale, v_dim=v_dim)
        warnings.warn(
            "flex takes no slot bias (the adaptive budget's rank mask): those calls run the torch backend",
            stacklevel=2,
        )
        return torch_fn(
            q, latents, indices, layout, scale=scale, v_dim=v_dim, slot_bias=slot_bias, biased_rows=biased_rows
        )

    return attend


def common_dtype(q: torch.Tensor, latents: torch.Tensor) -> torch.dtype:
    """Under autocast its dtype, as dense SDPA runs then (the fused kernels would otherwise get float32
    inputs, or queries and rows of different dtypes); else the promotion of both."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return torch.promote_types(q.dtype, latents.dtype)


def sparse_attention(
    q: torch.Tensor,
    latents: torch.Tensor,
    indices: torch.Tensor,
    layout: SparseLayout,
    *,
    scale: float,
    v_dim: int,
    backend: str | Callable = "torch",
    slot_bias: torch.Tensor | None = None,
    biased_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [B, H, L, D], latents [B, L, D], indices [B, R, K] -> (out [B, H, L, v_dim], slot probs or None).

    `backend` is a name or a function from `backend_function`. `slot_bias` ([B, R, K]) is added to each
    slot's logit (after scaling); the adaptive budget's soft rank mask is exactly 0 in the forward pass
    and only carries gradient. Token mode also returns the head-averaged attention probabilities of each
    selected slot ([B, L, K], detached; the indexer's KL target); the torch block backend, each selected
    block's mass ([B, R, K], detached).
    """
    if isinstance(backend, str):
        backend = backend_function(backend, q.device, layout.block_size, layout.query_block)
    dtype = common_dtype(q, latents)
    args = dict(scale=scale, v_dim=v_dim, slot_bias=slot_bias, biased_rows=biased_rows)
    return backend(q.to(dtype), latents.to(dtype), indices, layout, **args)
