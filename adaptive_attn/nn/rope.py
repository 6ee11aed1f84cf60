"""Rotary position embedding (rotate-half convention)."""

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables for `dim` rotary dimensions; `apply_rope` rotates a tensor with them."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim = dim
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2).float() / dim), persistent=False)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (L, dtype, device) -> (cos, sin)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin: [L, dim], computed once per length, dtype and device"""
        key = (seq_len, dtype, self.inv_freq.device)
        if key not in self._tables:
            with torch.inference_mode(False):  # tables made during validation must serve training too
                pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float64)
                angles = torch.outer(pos, self.inv_freq.double())
                angles = torch.cat([angles, angles], dim=-1)
                self._tables[key] = angles.cos().to(dtype), angles.sin().to(dtype)
        return self._tables[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., L, dim]; cos/sin: [L, dim] -> [..., L, dim]"""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
