"""Adaptive budget controller: sequence features -> a keep ratio per query (and so a k).

Every feature at position t is a *prefix* statistic over positions <= t, so the k of query t never
depends on later tokens (a k computed from the whole sequence would leak the future into earlier
logits). A query block uses the features of its first query.

- `ContentComplexityAnalyzer`: token diversity (1 - |mean of unit hidden states|), next-embedding
  predictability (mean cosine between consecutive hidden states) and variance of the hidden states.
- `AttentionEntropyEstimator`: normalised entropy of the indexer's own softmax over the eligible
  positions (no extra O(L^2) attention).
- a length factor: log(L) / log(reference length).
- `AdaptiveKCalculator`: keep_t = lo + (hi - lo) * sigmoid(w . f_t + b - lambda), k_t = keep_t * L.
  `lambda` is the multiplier of the budget constraint "spend the compute of a fixed keep = target",
  raised by dual ascent while the selection attends more query-key pairs than that fixed budget would
  and lowered while fewer. (Holding mean k / L at the target instead would overspend: short prefixes
  cannot use a large k, so a budget that gives early queries less and late ones more attends more
  pairs than the fixed k of the same mean.)
- `DynamicSparsityController`: ties them together and keeps its last factor values for logging (the
  sparse attention layer records the k it produced).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def prefix_mean(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean over positions <= t along `dim`."""
    count = torch.arange(1, x.shape[dim] + 1, device=x.device, dtype=x.dtype)
    shape = [1] * x.dim()
    shape[dim] = -1
    return x.cumsum(dim) / count.view(shape)


class ContentComplexityAnalyzer(nn.Module):
    """x [B, L, D] -> prefix features [B, L, 3]: diversity, predictability, variance (each ~[0, 1])."""

    n_features = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)  # positions <= t
        unit = F.normalize(x, dim=-1)
        consecutive = (unit[:, 1:] * unit[:, :-1]).sum(-1)
        consecutive = torch.cat([torch.ones_like(consecutive[:, :1]), consecutive], dim=1)
        diversity = 1 - unit.cumsum(1).norm(dim=-1) / count
        predictability = (prefix_mean(consecutive).clamp(-1, 1)) * 0.5 + 0.5
        second_moment = prefix_mean(x.norm(dim=-1).pow(2)) / x.shape[-1]
        mean_sq = (x.cumsum(1).norm(dim=-1) / count).pow(2) / x.shape[-1]  # |prefix mean of x|^2 / D
        variance = (second_moment - mean_sq).clamp_min(0) / (second_moment + 1e-6)
        return torch.stack([diversity, predictability, variance], dim=-1)


class AttentionEntropyEstimator(nn.Module):
    """Indexer scores [B, R, S] (-inf where ineligible) -> normalised entropy [B, R] in [0, 1].
    `n_eligible` [R] (eligible columns per row) spares counting the finite scores."""

    def forward(self, scores: torch.Tensor, n_eligible: torch.Tensor | None = None) -> torch.Tensor:
        n = (scores > float("-inf")).sum(-1) if n_eligible is None else n_eligible
        entropy = torch.special.entr(scores.softmax(-1)).sum(-1)  # -p log p, 0 where p = 0
        return torch.where(n > 1, entropy / n.clamp_min(2).to(scores.dtype).log(), torch.zeros_like(entropy))


class AdaptiveKCalculator(nn.Module):
    """Features [B, R, F] -> keep ratio [B, R] in [lo, hi], differentiable in the weights."""

    def __init__(self, n_features: int, target: float, lo: float = 0.02, hi: float = 1.0, dual_lr: float = 0.5):
        super().__init__()
        if not lo < target < hi:
            raise ValueError(f"model.budget.target must be in ({lo}, {hi}), got {target}")
        self.lo, self.hi, self.target, self.dual_lr = lo, hi, target, dual_lr
        # prior: more complex / more uncertain content gets more keys; the LM loss refines it
        self.weight = nn.Parameter(torch.ones(n_features))
        self.bias = nn.Parameter(torch.tensor(math.log((target - lo) / (hi - target))))
        self.register_buffer("multiplier", torch.zeros(()))  # lambda of the budget constraint

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - 0.5
        z = (centred * self.weight).sum(-1) + self.bias - self.multiplier
        return self.lo + (self.hi - self.lo) * torch.sigmoid(z)

    @torch.no_grad()
    def dual_step(self, realised_keep: float) -> None:
        """Dual ascent on the budget constraint: lambda += lr * (realised keep - target)."""
        self.multiplier += self.dual_lr * (realised_keep - self.target)


class DynamicSparsityController(nn.Module):
    """Budget policy `adaptive`: per-query k (tokens) from length, content complexity and entropy."""

    def __init__(
        self, target: float = 0.25, reference_len: int = 2048, lo: float = 0.02, hi: float = 1.0, dual_lr: float = 0.5
    ):
        super().__init__()
        self.complexity = ContentComplexityAnalyzer()
        self.entropy = AttentionEntropyEstimator()
        self.calculator = AdaptiveKCalculator(ContentComplexityAnalyzer.n_features + 2, target, lo, hi, dual_lr)
        self.reference_len = reference_len
        self.factors: dict[str, torch.Tensor] = {}  # batch means of the last call's features, for logging

    def forward(
        self, x: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, n_eligible=None, **_
    ) -> torch.Tensor:
        """x [B, L, D], indexer scores [B, R, S], positions [R] (each row's deciding query)
        -> k [B, R] (float tokens, differentiable in the calculator's parameters)."""
        L = x.shape[1]
        content = self.complexity(x)[:, positions]
        entropy = self.entropy(scores.detach(), n_eligible)
        length = torch.full_like(entropy, math.log(L) / math.log(self.reference_len))
        features = torch.cat([content, entropy[..., None], length[..., None]], dim=-1)
        self.factors = {
            "diversity": content[..., 0].detach().mean(),
            "predictability": content[..., 1].detach().mean(),
            "variance": content[..., 2].detach().mean(),
            "entropy": entropy.mean(),
            "length": length.mean(),
        }
        return self.calculator(features) * L

    @property
    def target(self) -> float:
        return self.calculator.target

    def after_step(self, realised_keep: float) -> None:
        """After each training step: dual ascent on the budget constraint with the batch's keep."""
        self.calculator.dual_step(realised_keep)

    def stats(self) -> dict[str, torch.Tensor]:
        return {
            **{f"factor_{k}": v for k, v in self.factors.items()},
            "multiplier": self.calculator.multiplier.clone(),
            "target": torch.tensor(self.calculator.target),
        }
