"""Adaptive budget controller: sequence features -> a keep ratio per group of queries (and so a k).

Every feature at position t is a *prefix* statistic over positions <= t, so the k of query t never
depends on later tokens (a k computed from the whole sequence would leak the future into earlier
logits). Queries decide their budget in groups of `query_stride` consecutive positions, each group by
its first query (in block mode a group is made of whole query blocks). Deciding once per
group, not once per query, cuts the controller's cost by about the stride; each query still selects
its own top-k, only the size k is shared within a group.

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

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.sparse.budget import check_target

# the controller's features, in the order of its calculator's weights
FEATURES = ("diversity", "predictability", "variance", "entropy", "length")


def prefix_sums_at(positions: torch.Tensor, *series: torch.Tensor) -> list[torch.Tensor]:
    """Sums over positions <= p of each series [B, L, ...] at each of the ascending `positions` [P]
    -> one [B, P, ...] per series. Each position is added once, into the segment of the first of
    `positions` at or after it (the segments are found once for all series)."""
    L = series[0].shape[1]
    if len(positions) == L:  # every position: a plain running sum
        return [x.cumsum(1) for x in series]
    segment = torch.searchsorted(positions, torch.arange(L, device=positions.device))  # [L]; P = after the last
    return [
        x.new_zeros(x.shape[0], len(positions) + 1, *x.shape[2:]).index_add_(1, segment, x)[:, :-1].cumsum(1)
        for x in series
    ]


class ContentComplexityAnalyzer(nn.Module):
    """x [B, L, D], ascending positions [P] (default: all) -> prefix features [B, P, 3] at those positions:
    diversity, predictability, variance (each ~[0, 1])."""

    n_features = 3

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        D = x.shape[-1]
        positions = torch.arange(x.shape[1], device=x.device) if positions is None else positions
        count = (positions + 1).to(x.dtype)
        norm = x.norm(dim=-1)
        unit = x / norm.clamp_min(1e-12)[..., None]
        consecutive = F.pad(torch.linalg.vecdot(unit[:, 1:], unit[:, :-1]), (1, 0), value=1.0)  # cos(x_t, x_t-1)
        unit_sum, x_sum, scalar_sums = prefix_sums_at(positions, unit, x, torch.stack([consecutive, norm.pow(2)], -1))
        cosine_sum, square_sum = scalar_sums.unbind(-1)
        diversity = 1 - unit_sum.norm(dim=-1) / count
        predictability = (cosine_sum / count).clamp(-1, 1) * 0.5 + 0.5
        second_moment = square_sum / count / D
        mean_sq = (x_sum.norm(dim=-1) / count).pow(2) / D  # |prefix mean of x|^2 / D
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
    """Features [B, R, F] -> keep ratio [B, R] in [lo, hi], differentiable in the weights.

    The LM loss favours more keys everywhere, which the dual ascent holds back. With `learn_level` (the
    default) it trains the bias and weights on features centred at 0.5, and so also pushes k's overall
    level. Without, the bias stays at its prior and the features are centred at their running means (from
    earlier steps, so a forward never sees other positions): the weights' gradient then says only which
    content should get more keys than the mean, and the level is the dual ascent's alone. A controller
    trained much faster than the dual ascent needs that, or it outruns the budget."""

    def __init__(
        self,
        n_features: int,
        target: float,
        lo: float = 0.02,
        hi: float = 1.0,
        dual_lr: float = 0.5,
        learn_level: bool = True,
        centre_momentum: float = 0.05,
    ):
        super().__init__()
        check_target(target, lo, hi)
        self.lo, self.hi, self.target, self.dual_lr = lo, hi, target, dual_lr
        self.learn_level, self.centre_momentum = learn_level, centre_momentum
        # prior: more complex / more uncertain content gets more keys; the LM loss refines it
        self.weight = nn.Parameter(torch.ones(n_features))
        bias = torch.tensor(math.log((target - lo) / (hi - target)))
        if learn_level:
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("bias", bias)
            self.register_buffer("centre", torch.full((n_features,), 0.5))  # running means of the features
        self.register_buffer("multiplier", torch.zeros(()))  # lambda of the budget constraint

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        centred = features - (0.5 if self.learn_level else self.centre)
        z = (centred * self.weight).sum(-1) + self.bias - self.multiplier
        return self.lo + (self.hi - self.lo) * torch.sigmoid(z)

    @torch.no_grad()
    def dual_step(self, realised_keep: float, feature_means: torch.Tensor | None = None) -> None:
        """Dual ascent on the budget constraint: lambda += lr * (realised keep - target); without
        `learn_level`, the running means of the features move towards this step's [F]."""
        self.multiplier += self.dual_lr * (realised_keep - self.target)
        if not self.learn_level and feature_means is not None:
            self.centre.lerp_(feature_means.to(self.centre), self.centre_momentum)


def check_query_stride(query_stride) -> None:
    if not (isinstance(query_stride, int) and query_stride >= 1):
        raise ValueError(f"model.budget.query_stride={query_stride!r} is invalid: must be an integer >= 1")


class DynamicSparsityController(nn.Module):
    """Budget policy `adaptive`: k (tokens) per group of `query_stride` positions, from length, content
    complexity and entropy at the group's first query."""

    def __init__(
        self,
        target: float = 0.25,
        reference_len: int = 2048,
        lo: float = 0.02,
        hi: float = 1.0,
        dual_lr: float = 0.5,
        query_stride: int = 16,
        lr_scale: float = 1.0,
        learn_level: bool = True,
    ):
        super().__init__()
        check_query_stride(query_stride)
        self.lr_scale = lr_scale  # the optimiser trains this module's parameters at lr * lr_scale
        self.complexity = ContentComplexityAnalyzer()
        self.entropy = AttentionEntropyEstimator()
        self.calculator = AdaptiveKCalculator(len(FEATURES), target, lo, hi, dual_lr, learn_level)
        self.reference_len, self.query_stride = reference_len, query_stride
        self.feature_means: torch.Tensor | None = None  # [F] batch means of the last call's features

    def forward(self, x: torch.Tensor, scores: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """x [B, L, D], indexer scores [B, R, C] -> k [B, R] in the layout's columns (float,
        differentiable in the calculator's parameters)."""
        L = x.shape[1]
        group = layout.row_positions // self.query_stride
        first = torch.ones_like(group, dtype=torch.bool)
        first[1:] = group[1:] != group[:-1]
        deciding = first.nonzero().squeeze(1)  # the first row of each group decides for it
        content = self.complexity(x, layout.row_positions[deciding])
        entropy = self.entropy(scores.detach()[:, deciding], layout.n_eligible[deciding])
        length = torch.full_like(entropy, math.log(L) / math.log(self.reference_len))
        features = torch.cat([content, entropy[..., None], length[..., None]], dim=-1)
        self.feature_means = features.mean((0, 1))  # no gradient: x and the scores are detached
        keep = self.calculator(features)[:, first.cumsum(0) - 1]  # each row gets its group's keep
        return layout.columns_for_tokens(keep * L)

    def target_keep(self, layout: SparseLayout) -> float:
        return self.calculator.target

    def update(self, realised_keep: float) -> None:
        """After each training step: dual ascent on the budget constraint with the batch's keep."""
        self.calculator.dual_step(realised_keep, self.feature_means)

    def stats(self) -> dict[str, torch.Tensor]:
        """The last call's mean features, and the calculator's weights (the prior is 1 each: whether the
        LM loss moves them says whether k's policy is learned or stays the prior)."""
        means = () if self.feature_means is None else self.feature_means
        weights = self.calculator.weight.detach().clone()
        return {
            **{f"factor_{k}": v for k, v in zip(FEATURES, means)},
            **{f"weight_{k}": w for k, w in zip(FEATURES, weights)},
            "weight_bias": self.calculator.bias.detach().clone(),
            "multiplier": self.calculator.multiplier.clone(),
            "target": torch.tensor(self.calculator.target),
        }
