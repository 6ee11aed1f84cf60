"""The DSA layer and its parts: layout geometry, indexer, the indexer's KL, stages, fixed budgets' compute."""

import math

import pytest
import torch

from adaptive_attn.model.llm import FixedSparseMoELLM
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.torch_block import torch_block_attention
from adaptive_attn.sparse import losses
from adaptive_attn.sparse.budget import fixed_k
from adaptive_attn.sparse.dsa import selected_scores
from adaptive_attn.sparse.indexer import LightningIndexer
from tests.helpers import random_selection, tiny_model_kwargs

SPARSE_MODES = {"token": {}, "block": {"block_size": 4, "query_block": 8}}


def layer_stats(model, tokens) -> dict:
    """The first DSA layer's statistics of one forward pass."""
    _, aux = model(tokens)
    return aux["sparsity"][0]


@pytest.mark.parametrize("L,block,qblock,k", [(50, 1, 1, 7), (100, 4, 16, 3), (33, 4, 12, 100), (64, 8, 8, 0)])
def test_attended_pairs_equal_a_count_of_the_selection_mask(L, block, qblock, k):
    idx, layout = random_selection(3, L, k, block, qblock, per_row=k > 0)
    mask = layout.selection_mask(idx)
    assert torch.equal(layout.attended_pairs((idx >= 0).sum(-1)), mask.sum((1, 2)).double())
    pos = torch.arange(L)
    assert not (mask & (pos[None, :] > pos[:, None])).any()  # never a future key


def test_layout_geometry_of_padded_blocks():
    layout = SparseLayout(100, block_size=4, query_block=16)
    assert (layout.n_rows, layout.n_columns, layout.padded_len, layout.diagonal_tokens) == (7, 28, 112, 16)
    assert layout.row_positions.tolist() == [0, 16, 32, 48, 64, 80, 96]
    assert layout.n_eligible.tolist() == [0, 4, 8, 12, 16, 20, 24]
    assert layout.row_queries.tolist() == [16] * 6 + [4]
    # k in tokens -> past blocks besides the diagonal: ceil((k - 16) / 4), within [0, all columns]
    assert [layout.hard_columns(layout.columns_for_tokens(k)) for k in (1, 16, 17, 25, 1000)] == [0, 0, 1, 3, 28]
    tokens = SparseLayout(10)
    assert [tokens.hard_columns(k) for k in (0, 0.2, 3, 3.5, 99)] == [1, 1, 3, 4, 10]


def test_per_key_values_hold_for_every_query_of_their_row_and_every_key_of_their_column():
    layout = SparseLayout(100, block_size=4, query_block=16)  # padded: 7 rows of 16 queries, 28 columns of 4 keys
    per_column = torch.randn(2, layout.n_rows, layout.n_columns)
    pos = torch.arange(100)
    expected = per_column[:, pos // 16][:, :, pos // 4]  # [B, L, L]: query t's row, key s's column
    assert torch.equal(layout.per_key(per_column), expected)


def test_indexer_scores_are_eq1_term_by_term():
    """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]), summed head by head in a loop, against the indexer's
    vectorised score (the one both token and block scores go through), values and gradients."""
    torch.manual_seed(0)
    shapes = ((2, 5, 3, 8), (2, 5, 3), (2, 7, 8))
    q, w, k = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes)
    expected = sum(w[:, :, j, None] * torch.einsum("btd,bsd->bts", q[:, :, j], k).relu() for j in range(3))
    scores = LightningIndexer.score(q, w, k)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(scores)
    grads = torch.autograd.grad(scores, (q, w, k), upstream)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, w, k), upstream)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [3, 4, 256])
def test_token_scores_in_causal_chunks_equal_the_whole_masked_score_matrix(chunk_size):
    """Chunks that score only the keys up to their last query give eq. 1 over all pairs, masked to the
    past, in value and gradient."""
    torch.manual_seed(0)
    indexer = LightningIndexer(16, n_heads=2, head_dim=8, rope_dim=4, chunk_size=chunk_size).double()
    layout = SparseLayout(10)
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    q, w, k = indexer.project(x)
    expected = LightningIndexer.score(q, w, k).masked_fill(~layout.eligible, float("-inf"))
    scores = indexer(x, layout)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected))
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(scores)
    past = ~torch.isinf(expected)
    (got,) = torch.autograd.grad(scores, x, upstream * past)
    (want,) = torch.autograd.grad(expected, x, upstream * past)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_selected_scores_from_the_chunks_equal_the_whole_score_matrix_gathered():
    """The sparse stage's KL in token mode gathers the selected keys' scores from the indexer's chunks (the
    whole matrix is built without gradient): the same values and the same gradient to the indexer's weights
    as gathered from the whole matrix, unused slots included."""
    torch.manual_seed(0)
    indexer = LightningIndexer(16, n_heads=2, head_dim=8, rope_dim=4, chunk_size=4).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    indices, layout = random_selection(2, 10, 3)
    indices[0, 4, 1:] = -1
    got = selected_scores(None, indexer.token_score_chunks(x), indices)
    want = selected_scores(indexer(x, layout), None, indices)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    upstream, weights = torch.randn_like(got), list(indexer.parameters())
    for g_got, g_want in zip(
        torch.autograd.grad(got, weights, upstream), torch.autograd.grad(want, weights, upstream), strict=True
    ):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


def test_block_scores_of_a_query_block_ignore_its_own_and_later_tokens():
    indexer = LightningIndexer(16, n_heads=2, head_dim=8, rope_dim=4).double()
    layout = SparseLayout(64, block_size=8, query_block=16)
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    base = indexer(x, layout)
    changed = x.clone()
    changed[:, 33:] = torch.randn(1, 31, 16, dtype=torch.float64)  # inside query block 2 and later
    after = indexer(changed, layout)
    assert torch.equal(base[:, :3], after[:, :3])
    assert torch.isinf(base[0, 1, 2:]).all() and torch.isfinite(base[0, 1, :2]).all()


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_lm_loss_trains_model_and_kl_trains_indexer(mode):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=0.5, sparse={**SPARSE_MODES[mode]})
    tokens = torch.randint(0, 50, (2, 48))
    logits, aux = model(tokens)
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    params = dict(model.named_parameters())
    lm_grads = torch.autograd.grad(lm, list(params.values()), retain_graph=True, allow_unused=True)
    kl_grads = torch.autograd.grad(aux["indexer_kl"], list(params.values()), allow_unused=True)
    for (name, _), g_lm, g_kl in zip(params.items(), lm_grads, kl_grads):
        lm_norm = 0.0 if g_lm is None else float(g_lm.abs().sum())
        kl_norm = 0.0 if g_kl is None else float(g_kl.abs().sum())
        if ".indexer." in name:
            assert lm_norm == 0.0, f"LM loss reached indexer parameter {name}"
        else:
            assert kl_norm == 0.0, f"indexer KL reached model parameter {name}"
    assert any(".indexer." in n and g is not None and g.abs().sum() > 0 for n, g in zip(params, kl_grads))


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_warmup_stage_is_dense_then_sparse(mode):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=0.25, sparse=SPARSE_MODES[mode])
    tokens = torch.randint(0, 50, (2, 64))
    model.set_sparse_stage(False)
    _, aux = model(tokens)
    assert aux["sparsity"][0]["pairs_share"] == 1.0 and aux["indexer_kl"] > 0
    model.set_sparse_stage(True)
    sparse_stats = layer_stats(model, tokens)
    assert 0.3 < sparse_stats["pairs_share"] < 0.6 and sparse_stats["equivalent_keep"] == 0.25


def test_fixed_budget_attends_min_k_t_plus_1_keys_per_query():
    L, keep = 64, 0.25
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=keep, sparse={})
    stats = layer_stats(model, torch.randint(0, 50, (2, L)))
    k = math.ceil(keep * L)
    expected = sum(min(k, t + 1) for t in range(L)) / (L * (L + 1) / 2)
    assert abs(float(stats["pairs_share"]) - expected) < 1e-12
    assert float(stats["equivalent_keep"]) == keep and float(stats["k_mean"]) == k


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5])
def test_fixed_block_budget_attends_the_pairs_of_its_keep(keep):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=keep, sparse={**SPARSE_MODES["block"]})
    stats = layer_stats(model, torch.randint(0, 50, (2, 45)))
    layout = SparseLayout(45, 4, 8)
    past_blocks = layout.hard_columns(fixed_k(keep, layout))
    assert float(stats["k_mean"]) == past_blocks == max(0, math.ceil((math.ceil(keep * 45) - 8) / 4))
    assert abs(float(stats["equivalent_keep"]) - keep) < 1e-12


@pytest.mark.parametrize("target_from_op", [False, True])
def test_block_kl_target_matches_a_dense_computation(target_from_op):
    """From a separate computation of the target, or from the mass the attention op returned (values of
    one column, so 7 free columns hold every call's 5 slots and 2 diagonal blocks)."""
    B, H, L, D, block, qblock = 2, 3, 300, 8, 4, 8
    idx, layout = random_selection(B, L, 5, block, qblock)
    q, latents = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    scores = torch.randn(B, layout.n_rows, layout.n_columns, dtype=torch.float64)
    op_mass = torch_block_attention(q, latents, idx, layout, scale=0.4, v_dim=1)[1] if target_from_op else None
    assert not target_from_op or not op_mass.isnan().any()
    got = losses.kl_selected(q, latents, scores.gather(-1, idx.clamp(min=0)), idx, op_mass, layout, scale=0.4)

    pos = torch.arange(L)
    attended = torch.zeros(B, L, L, dtype=torch.bool)  # built here from the definition, not by the layout
    for b in range(B):
        for t in range(L):
            blocks = [int(c) for c in idx[b, t // qblock] if c >= 0] + [t // block]
            attended[b, t] = (pos <= t) & (
                torch.isin(pos // block, torch.tensor(blocks)) | (pos // qblock == t // qblock)
            )
    logits = torch.einsum("bhld,bsd->bhls", q, latents) * 0.4
    probs = logits.masked_fill(~attended[:, None], float("-inf")).softmax(-1).mean(1)
    total, rows = 0.0, 0
    for b in range(B):
        for r in range(layout.n_rows):
            chosen = idx[b, r][idx[b, r] >= 0]
            if not len(chosen):
                continue
            queries = slice(r * qblock, min(L, (r + 1) * qblock))
            mass = torch.stack([probs[b, queries, c * block : (c + 1) * block].sum() for c in chosen])
            p = mass / mass.sum()
            total += float((p * (p.log() - scores[b, r, chosen].log_softmax(-1))).sum())
            rows += 1
    assert abs(float(got) - total / rows) < 1e-9


@pytest.mark.parametrize("op_rows", ["none", "half"])
def test_block_kl_from_a_draw_of_query_blocks_is_unbiased(op_rows):
    """The mean of many subsampled estimates equals the full KL within three standard errors (each below 2%
    of it), and the draws do differ; also when the op returned the target of half the rows (those count
    exactly, the rest are drawn)."""
    B, H, L, D = 2, 2, 96, 8
    idx, layout = random_selection(B, L, 3, 4, 8, per_row=True)
    idx[1, 5:9] = -1  # rows without a selection in one sequence: the mean is over the rows that have one
    q, latents = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    scores = torch.randn(B, layout.n_rows, layout.n_columns, dtype=torch.float64)
    full = float(losses.kl_selected(q, latents, scores.gather(-1, idx.clamp(min=0)), idx, None, layout, scale=0.4))
    op_mass = None
    if op_rows == "half":
        op_mass = losses.block_mass(q, latents, idx, layout, 0, layout.n_rows, 0.4) * (idx >= 0)
        op_mass[0, ::2] = float("nan")
        op_mass[1, 1::2] = float("nan")
        assert (
            abs(
                float(
                    losses.kl_selected(q, latents, scores.gather(-1, idx.clamp(min=0)), idx, op_mass, layout, scale=0.4)
                )
                - full
            )
            < 1e-12
        )
    draws = torch.tensor(
        [
            float(
                losses.kl_selected(
                    q, latents, scores.gather(-1, idx.clamp(min=0)), idx, op_mass, layout, scale=0.4, row_fraction=0.25
                )
            )
            for _ in range(2000)
        ]
    )
    standard_error = float(draws.std()) / len(draws) ** 0.5
    assert draws.std() > 0.05 * full and standard_error < 0.02 * full
    assert abs(float(draws.mean()) - full) < 3 * standard_error


@pytest.mark.parametrize("mode", ["token", "block"])
def test_warmup_kl_matches_a_dense_computation(mode):
    """The warm-up KL, from the indexer's scores in chunks (token mode) or whole (block mode), equals the
    definition over full causal rows (every eligible column), in value and in its gradient to the scores."""
    torch.manual_seed(0)
    B, H, L, D, block, qblock = 2, 3, 45, 8, 4, 8
    layout = SparseLayout(L, 1) if mode == "token" else SparseLayout(L, block, qblock)
    q, latents = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    scores = torch.randn(B, layout.n_rows, layout.n_columns, dtype=torch.float64, requires_grad=True)
    if mode == "token":  # chunks of 16 queries, each over the keys before its last
        chunks = [scores[:, c0 : c0 + 16, : min(c0 + 16, L)] for c0 in range(0, L, 16)]
        got = losses.kl_dense_tokens(q, latents, chunks, scale=0.4)
    else:
        got = losses.kl_dense_blocks(q, latents, scores.masked_fill(~layout.eligible, float("-inf")), layout, scale=0.4)

    pos = torch.arange(L)
    logits = torch.einsum("bhld,bsd->bhls", q, latents) * 0.4
    probs = logits.masked_fill(pos[None, :] > pos[:, None], float("-inf")).softmax(-1).mean(1)  # [B, L, L]
    terms = []
    for b in range(B):
        for r in range(layout.n_rows):
            if mode == "token":
                p, s = probs[b, r, : r + 1], scores[b, r, : r + 1]
            else:
                n = int(layout.n_eligible[r])
                if n == 0:
                    continue
                rows = probs[b, r * qblock : min(L, (r + 1) * qblock)]
                p = torch.stack([rows[:, c * block : (c + 1) * block].sum() for c in range(n)])
                p, s = p / p.sum(), scores[b, r, :n]
            terms.append((p * (p.log() - s.log_softmax(-1))).sum())
    want = torch.stack(terms).mean()
    assert abs(float(got.detach()) - float(want.detach())) < 1e-12
    (grad_got,) = torch.autograd.grad(got, scores)
    (grad_want,) = torch.autograd.grad(want, scores)
    torch.testing.assert_close(grad_got, grad_want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [4, 128])
def test_attention_mass_recall_equals_the_dense_masked_mass(chunk_size):
    """Each mask's share of the dense causal attention mass (heads averaged, then queries), all masks from one
    pass, in chunks of queries that need not divide L."""
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 13, 8
    q, latents = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    probs = (torch.einsum("bhld,bsd->bhls", q, latents) * 0.3).masked_fill(~causal, float("-inf")).softmax(-1)
    masks = [torch.rand(B, L, L) < 0.4, causal.expand(B, L, L), torch.zeros(B, L, L, dtype=torch.bool)]
    recalls = losses.attention_mass_recall(q, latents, masks, scale=0.3, chunk_size=chunk_size)
    expected = [(probs.mean(1) * mask).sum(-1).mean() for mask in masks]
    assert torch.allclose(torch.stack(recalls), torch.stack(expected), atol=1e-12)
    assert recalls[1] == pytest.approx(1.0) and recalls[2] == 0.0 and 0 < recalls[0] < 1
