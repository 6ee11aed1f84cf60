"""Budget policies: how many columns (`k`) each row of a `SparseLayout` may select.

A policy is called as `budget(x, scores, layout)` with the detached hidden states `[B, L, D]` and the
indexer scores `[B, R, C]`, and returns k in the layout's columns (tokens, or key blocks besides the
diagonal ones): a number, or a tensor `[B, R]` (float, differentiable where the policy learns).
`target_keep(layout)` is the keep whose compute it spends: after each training step
`update(realised_keep)` (the fixed keep that would have attended as many query-key pairs) lets it
adjust to it. `stats()` names what it reports. The adaptive controller lives in `controller.py`, the
oracle and shuffled controls in `controls.py`.
"""

import math

import torch
from torch import nn

from adaptive_attn.ops.layout import SparseLayout


def check_keep(keep, k=None) -> None:
    """A fixed budget is a keep in (0, 1] or an absolute k >= 1 tokens, not both; ValueError naming the key."""
    if (keep is None) == (k is None):
        raise ValueError(f"model.keep={keep!r} and model.k={k!r} are invalid: give exactly one of them")
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise ValueError(f"model.keep={keep!r} is invalid: must be in (0, 1]")
    if k is not None and not (isinstance(k, int) and k >= 1):
        raise ValueError(f"model.k={k!r} is invalid: must be an integer >= 1 (tokens)")


def check_target(target, lo: float = 0.0, hi: float = 1.0) -> None:
    if not (isinstance(target, (int, float)) and lo < target < hi):
        raise ValueError(f"model.budget.target={target!r} is invalid: must be in ({lo}, {hi})")


def budget_tokens(keep: float, seq_len: int) -> int:
    """The tokens a budget `keep` gives every query: ceil(keep * L), at least one."""
    return max(1, math.ceil(keep * seq_len))


def fixed_k(keep: float, layout: SparseLayout) -> float:
    """The fixed budget's k: `budget_tokens` in the layout's columns. Every budget whose target is `keep`
    spends the compute of this k."""
    return layout.columns_for_tokens(budget_tokens(keep, layout.seq_len))


def check_selects_blocks(budget: str, tokens: int, block_size: int, query_block: int) -> None:
    """In block mode every query block attends its own key blocks anyway; a budget of no more tokens than
    those (`fixed_k` <= 0) selects nothing, and the sparse model is local attention. `budget` names the
    setting (e.g. "model.keep=0.25 at seq_len=512"); ValueError."""
    if block_size > 1 and tokens <= query_block:
        raise ValueError(
            f"{budget} is invalid: its {tokens} tokens are no more than the {query_block} of a query block's own "
            "key blocks, so nothing is selected; use a smaller model.sparse.query_block (and block_size) or a "
            "larger budget"
        )


def fixed_pairs(keep: float, layout: SparseLayout) -> torch.Tensor:
    """Causal (query, key) pairs a fixed budget `keep` attends per sequence."""
    return layout.attended_pairs(layout.n_eligible.clamp(max=layout.hard_columns(fixed_k(keep, layout))))


class FixedBudget(nn.Module):
    """One k for every query of every sequence, as in DSA: ceil(keep * L) tokens, or an absolute k tokens
    (the same at every length)."""

    def __init__(self, keep: float | None = None, k: int | None = None):
        super().__init__()
        check_keep(keep, k)
        self.keep, self.k = keep, k

    def target_keep(self, layout: SparseLayout) -> float:
        return self.keep if self.k is None else min(1.0, self.k / layout.seq_len)

    def forward(self, x: torch.Tensor, scores: torch.Tensor, layout: SparseLayout) -> float:
        return fixed_k(self.target_keep(layout), layout)

    def update(self, realised_keep: float) -> None:
        pass

    def stats(self) -> dict[str, torch.Tensor]:
        return {}


class AdaptiveTopP(nn.Module):
    """Per row, the smallest set of columns holding probability mass `p` of the indexer's softmax
    (Twilight-style). `p` follows the budget by dual ascent: lowered while the selection spends more
    than a fixed keep = `target` would, raised while less."""

    def __init__(self, target: float = 0.25, p_init: float = 0.5, lr: float = 0.5):
        super().__init__()
        check_target(target)
        self.target, self.lr = target, lr
        self.register_buffer("p", torch.tensor(p_init))

    def target_keep(self, layout: SparseLayout) -> float:
        return self.target

    @torch.no_grad()
    def forward(self, x: torch.Tensor, scores: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        probs = scores.float().softmax(-1).nan_to_num(0.0)  # rows without eligible columns -> all zero
        sorted_probs = probs.sort(-1, descending=True).values
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the higher-ranked columns
        return ((before < self.p) & (sorted_probs > 0)).sum(-1)  # [B, R]

    @torch.no_grad()
    def update(self, realised_keep: float) -> None:
        self.p.add_(-self.lr * (realised_keep - self.target)).clamp_(1e-3, 1.0)

    def stats(self) -> dict[str, torch.Tensor]:
        return {"top_p": self.p.clone(), "target": torch.tensor(self.target)}
