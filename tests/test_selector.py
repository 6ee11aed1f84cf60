"""TopKTokenSelector: causal, k per sequence or row, own position kept, a total order on (score, position)."""

import pytest
import torch

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.sparse.selector import TopKTokenSelector


def draw_k(kind: int, B: int, L: int, g: torch.Generator):
    if kind == 0:
        return 1
    if kind == 1:
        return L + int(torch.randint(0, 5, (1,), generator=g))  # k >= L
    if kind == 2:
        return torch.randint(1, L + 2, (B,), generator=g)  # per sequence
    return torch.randint(1, L + 2, (B, L), generator=g)  # per query


@pytest.mark.parametrize("trial", range(30))
def test_selector_properties_on_random_inputs(trial):
    g = torch.Generator().manual_seed(trial)
    B, L = 3, int(torch.randint(1, 40, (1,), generator=g))
    scores = torch.randn(B, L, L, generator=g)
    k = draw_k(trial % 4, B, L, g)
    idx = TopKTokenSelector()(scores, k, SparseLayout(L))
    k_full = torch.as_tensor(k)
    k_full = (k_full.reshape(-1, 1) if k_full.dim() < 2 else k_full).expand(B, L)
    t = torch.arange(L)
    valid = idx >= 0
    assert (idx[valid] <= t.view(1, L, 1).expand_as(idx)[valid]).all(), "a future token was selected"
    assert (idx[..., 0] == t).all(), "a query's own position comes first"
    assert torch.equal(valid.sum(-1), torch.minimum(k_full, t + 1)), "-1 must appear only where fewer than k exist"
    for b in range(B):  # no duplicates, and the chosen are the best-scoring eligible ones
        for r in range(0, L, max(1, L // 5)):
            chosen = idx[b, r][idx[b, r] >= 0]
            assert chosen.unique().numel() == chosen.numel()
            others = torch.tensor([s for s in range(r) if s not in chosen.tolist()], dtype=torch.long)
            picked = chosen[chosen != r]
            if others.numel() and picked.numel():
                assert scores[b, r, picked].min() >= scores[b, r, others].max()


@pytest.mark.parametrize("sink_tokens", [0, 3])
@pytest.mark.parametrize("row_chunk", [1, 7, 16])
def test_rows_in_chunks_select_what_one_pass_selects(row_chunk, sink_tokens):
    """Token mode ranks a chunk of rows over the columns up to its last query only: the same indices, slot
    for slot, as one pass over every column, with ties (zeros after a ReLU) and every kind of k."""
    g = torch.Generator().manual_seed(row_chunk)
    B, L = 3, 37
    scores = torch.randn(B, L, L, generator=g).relu()  # half the scores tie at 0
    layout = SparseLayout(L)
    for kind in range(4):
        k = draw_k(kind, B, L, g)
        one_pass = TopKTokenSelector(sink_tokens, row_chunk=L)(scores, k, layout)
        chunked = TopKTokenSelector(sink_tokens, row_chunk=row_chunk)(scores, k, layout)
        assert torch.equal(chunked, one_pass)


def test_selection_of_a_row_depends_on_its_own_scores_and_k_alone():
    """Among tied scores the most recent positions win, whatever the other rows' budgets (which set K)."""
    g = torch.Generator().manual_seed(0)
    L = 60
    layout = SparseLayout(L)
    scores = torch.randint(0, 3, (2, L, L), generator=g).float()  # ties in every row
    k = torch.randint(1, 12, (2, L), generator=g)
    alone = TopKTokenSelector()(scores, k, layout)
    k_later = k.clone()
    k_later[:, 40:] = 50  # later rows take more: the largest k, and with it topk's K, grows
    with_later = TopKTokenSelector()(scores, k_later, layout)
    K = alone.shape[-1]
    assert with_later.shape[-1] > K
    assert torch.equal(with_later[:, :40, :K], alone[:, :40]) and (with_later[:, :40, K:] == -1).all()
    for b, r in [(0, 10), (1, 39), (0, 59)]:  # the chosen: by score, then by position from the most recent
        order = sorted(range(r), key=lambda s: (float(scores[b, r, s]), s), reverse=True)
        expected = [r] + order[: min(int(k[b, r]), r + 1) - 1]
        assert alone[b, r][alone[b, r] >= 0].tolist() == expected


def test_block_rows_select_only_blocks_wholly_before_their_query_block():
    layout = SparseLayout(100, block_size=4, query_block=16)  # 7 query blocks, 4 key blocks each
    scores = torch.randn(2, layout.n_rows, layout.n_columns)
    idx = TopKTokenSelector()(scores, 3, layout)
    for r in range(layout.n_rows):
        chosen = idx[:, r][idx[:, r] >= 0]
        assert (chosen < 4 * r).all() and (idx[:, r] >= 0).sum(-1).eq(min(3, 4 * r)).all()
