"""Short causal depthwise convolution (the BASED recipe): each channel of x_t mixes x_{t-k+1..t}."""

import torch
from torch import nn


class ShortConv(nn.Module):
    """x [B, L, D] -> x + depthwise causal conv(x) [B, L, D]. Mixing each token with its few predecessors
    spares attention learning a previous-token head (which associative recall otherwise needs first)."""

    def __init__(self, d_model: int, kernel_size: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
