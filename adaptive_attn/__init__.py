"""adaptive_attn: adaptive DeepSeek Sparse Attention in small DeepSeek-style MoE language models."""

__version__ = "0.1.0"
