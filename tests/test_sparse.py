import math

import pytest
import torch

from adaptive_attn.model.llm import FixedSparseMoELLM
from adaptive_attn.ops.sparse_attention import resolve_backend, sparse_attention, triton_available
from adaptive_attn.sparse.indexer import LightningIndexer
from adaptive_attn.sparse.selector import TopKTokenSelector
from tests.conftest import tiny_model_kwargs
from tests.test_model import assert_causal


@pytest.mark.parametrize("trial", range(30))
def test_selector_properties_on_random_inputs(trial):
    g = torch.Generator().manual_seed(trial)
    B = 3
    L = int(torch.randint(1, 40, (1,), generator=g))
    scores = torch.randn(B, L, L, generator=g)
    kind = trial % 4
    if kind == 0:
        k = 1
    elif kind == 1:
        k = L + int(torch.randint(0, 5, (1,), generator=g))  # k >= L
    elif kind == 2:
        k = torch.randint(1, L + 2, (B,), generator=g)  # per sequence
    else:
        k = torch.randint(1, L + 2, (B, L), generator=g)  # per query
    idx = TopKTokenSelector()(scores, k, torch.arange(1, L + 1), include_last=True)
    k_full = torch.as_tensor(k).reshape(-1, 1) if torch.as_tensor(k).dim() < 2 else torch.as_tensor(k)
    k_full = k_full.expand(B, L) if k_full.shape[0] == B else k_full.reshape(1, 1).expand(B, L)
    t = torch.arange(L)
    valid = idx >= 0
    assert (idx[valid] <= t.view(1, L, 1).expand_as(idx)[valid]).all(), "a future token was selected"
    assert (idx == t.view(1, L, 1)).any(-1).all(), "a query lost its own position"
    expected_count = torch.minimum(k_full, (t + 1).view(1, L))
    assert torch.equal(valid.sum(-1), expected_count), "-1 must appear only where fewer than k exist"
    for b in range(B):  # no duplicates, and the chosen are the best-scoring eligible ones
        for r in range(0, L, max(1, L // 5)):
            chosen = idx[b, r][idx[b, r] >= 0]
            assert chosen.unique().numel() == chosen.numel()
            others = torch.tensor([s for s in range(r) if s not in chosen.tolist()], dtype=torch.long)
            picked = chosen[chosen != r]
            if others.numel() and picked.numel():
                assert scores[b, r, picked].min() >= scores[b, r, others].max()


def test_selection_of_a_row_depends_on_its_own_scores_and_k_alone():
    """Among tied scores the most recent positions win, whatever the other rows' budgets (which set K)."""
    g = torch.Generator().manual_seed(0)
    L = 60
    scores = torch.randint(0, 3, (2, L, L), generator=g).float()  # ties in every row
    k = torch.randint(1, 12, (2, L), generator=g)
    alone = TopKTokenSelector()(scores, k, torch.arange(1, L + 1))
    k_later = k.clone()
    k_later[:, 40:] = 50  # later rows take more: the largest k, and with it topk's K, grows
    with_later = TopKTokenSelector()(scores, k_later, torch.arange(1, L + 1))
    K = alone.shape[-1]
    assert with_later.shape[-1] > K
    assert torch.equal(with_later[:, :40, :K], alone[:, :40]) and (with_later[:, :40, K:] == -1).all()
    for b, r in [(0, 10), (1, 39), (0, 59)]:  # the chosen: by score, then by position from the most recent
        order = sorted(range(r), key=lambda s: (float(scores[b, r, s]), s), reverse=True)
        expected = [r] + order[: min(int(k[b, r]), r + 1) - 1]
        assert alone[b, r][alone[b, r] >= 0].tolist() == expected


def random_token_selection(B, L, k, per_query=False):
    scores = torch.randn(B, L, L)
    kk = torch.randint(1, k + 1, (B, L)) if per_query else k
    return TopKTokenSelector()(scores, kk, torch.arange(1, L + 1))


def random_block_selection(B, L, k_blocks, block_size, query_block):
    n_qb = -(-L // query_block)
    m = query_block // block_size
    scores = torch.randn(B, n_qb, n_qb * m)
    return TopKTokenSelector()(scores, k_blocks, torch.arange(n_qb) * m, include_last=False)


def _grads(fn, *tensors):
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * weight).sum(), tensors)]


@pytest.mark.parametrize(
    "L,k,per_query", [(1, 1, False), (17, 5, False), (64, 16, True), (130, 200, False), (200, 40, True)]
)
def test_torch_token_backend_equals_reference(L, k, per_query):
    B, H, D, v = 2, 3, 10, 6
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_token_selection(B, L, k, per_query)
    results = {
        backend: _grads(lambda q, kv: sparse_attention(q, kv, idx, scale=0.3, v_dim=v, backend=backend)[0], q, kv)
        for backend in ("reference", "torch")
    }
    for ref, got in zip(results["reference"], results["torch"]):
        assert (ref - got).abs().max() < 1e-9
    _, p_ref = sparse_attention(q, kv, idx, scale=0.3, v_dim=v, backend="reference")
    _, p_torch = sparse_attention(q, kv, idx, scale=0.3, v_dim=v, backend="torch")
    assert (p_ref - p_torch).abs().max() < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_torch_token_attention_in_several_query_chunks_equals_reference(chunk_size):
    from adaptive_attn.ops.sparse_attention import torch_token_attention

    B, H, L, D = 2, 3, 50, 10
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_token_selection(B, L, 12, per_query=True)
    bias = torch.randn(idx.shape, dtype=torch.float64, requires_grad=True)
    ref = _grads(
        lambda q, kv, b: sparse_attention(q, kv, idx, scale=0.3, v_dim=6, backend="reference", slot_bias=b)[0],
        q,
        kv,
        bias,
    )
    got = _grads(
        lambda q, kv, b: torch_token_attention(q, kv, idx, scale=0.3, v_dim=6, slot_bias=b, chunk_size=chunk_size)[0],
        q,
        kv,
        bias,
    )
    for a, b in zip(ref, got):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize(
    "L,block,qblock,kb",
    [(64, 8, 8, 3), (100, 8, 16, 2), (33, 4, 12, 100), (256, 16, 32, 4), (300, 4, 8, 5), (70, 8, 16, 0)],
)
def test_torch_block_backend_equals_reference(L, block, qblock, kb):
    B, H, D, v = 2, 3, 10, 6
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_block_selection(B, L, kb, block, qblock)
    layout = dict(block_size=block, query_block=qblock)
    ref = _grads(
        lambda q, kv: sparse_attention(q, kv, idx, scale=0.3, v_dim=v, backend="reference", **layout)[0], q, kv
    )
    got = _grads(lambda q, kv: sparse_attention(q, kv, idx, scale=0.3, v_dim=v, backend="torch", **layout)[0], q, kv)
    for a, b in zip(ref, got):
        assert (a - b).abs().max() < 1e-9


def test_auto_backend_picks_the_fused_kernels_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, 64, 128) == "torch"
    assert resolve_backend("auto", cuda, 64, 128) == "flex"
    assert resolve_backend("auto", cuda, 8, 8) == "torch"  # smaller than FlexAttention's tile
    assert resolve_backend("auto", cuda, 1) == ("triton" if triton_available() else "torch")
    with pytest.raises(ValueError, match="block_size and query_block in multiples of 16, got 8 and 16"):
        resolve_backend("flex", cuda, 8, 16)
    with pytest.raises(ValueError, match="token-level"):
        resolve_backend("triton", cpu, 64)


def test_block_backend_with_per_sequence_budgets_equals_reference():
    """Sequences whose budgets differ a lot go one by one, each with its own whole-past prefix."""
    B, H, L, D, block, qblock = 3, 2, 96, 8, 8, 8
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_block_selection(B, L, torch.tensor([1, 6, 3]), block, qblock)
    layout = dict(block_size=block, query_block=qblock)
    results = [
        _grads(lambda q, kv: sparse_attention(q, kv, idx, scale=0.3, v_dim=5, backend=b, **layout)[0], q, kv)
        for b in ("reference", "torch")
    ]
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("max_call_elements", [1, 5000])
def test_block_backend_split_into_several_sdpa_calls_equals_reference(max_call_elements):
    from adaptive_attn.ops.sparse_attention import torch_block_attention

    B, H, L, D, block, qblock = 2, 3, 100, 10, 4, 8
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_block_selection(B, L, 3, block, qblock)
    layout = dict(block_size=block, query_block=qblock)
    ref = _grads(
        lambda q, kv: sparse_attention(q, kv, idx, scale=0.3, v_dim=6, backend="reference", **layout)[0], q, kv
    )
    got = _grads(
        lambda q, kv: torch_block_attention(
            q, kv, idx, scale=0.3, v_dim=6, max_call_elements=max_call_elements, **layout
        ),
        q,
        kv,
    )
    for a, b in zip(ref, got):
        assert (a - b).abs().max() < 1e-9


def test_full_selection_equals_dense_causal_attention():
    B, H, L, D = 2, 3, 50, 8
    q, kv = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    idx = random_token_selection(B, L, L)
    out, _ = sparse_attention(q, kv, idx, scale=0.5, v_dim=D, backend="torch")
    dense = torch.nn.functional.scaled_dot_product_attention(q, kv[:, None], kv[:, None], is_causal=True, scale=0.5)
    assert (out - dense).abs().max() < 1e-10


def test_block_scores_of_a_query_block_ignore_its_own_and_later_tokens():
    indexer = LightningIndexer(16, n_heads=2, head_dim=8, rope_dim=4).double()
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    base = indexer.block_scores(x, block_size=8, query_block=16)
    changed = x.clone()
    changed[:, 33:] = torch.randn(1, 31, 16, dtype=torch.float64)  # inside query block 2 and later
    after = indexer.block_scores(changed, block_size=8, query_block=16)
    assert torch.equal(base[:, :3], after[:, :3])
    assert torch.isinf(base[0, 1, 2:]).all() and torch.isfinite(base[0, 1, :2]).all()


SPARSE_MODES = {"token": {}, "block": {"block_size": 4, "query_block": 8}}


@pytest.mark.parametrize("mode", SPARSE_MODES)
@pytest.mark.parametrize("seq_len", [8, 29, 64])
def test_fixed25_model_is_causal(mode, seq_len):
    model = FixedSparseMoELLM(
        **tiny_model_kwargs(), keep=0.25, sparse={"warmup_steps": 0, **SPARSE_MODES[mode]}
    ).double()
    assert_causal(model, seq_len)


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_lm_loss_trains_model_and_kl_trains_indexer(mode):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=0.5, sparse={"warmup_steps": 0, **SPARSE_MODES[mode]})
    tokens = torch.randint(0, 50, (2, 48))
    logits, aux = model(tokens)
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    params = dict(model.named_parameters())
    lm_grads = torch.autograd.grad(lm, list(params.values()), retain_graph=True, allow_unused=True)
    kl_grads = torch.autograd.grad(aux["indexer_kl"], list(params.values()), allow_unused=True)
    for (name, _), g_lm, g_kl in zip(params.items(), lm_grads, kl_grads):
        is_indexer = ".indexer." in name
        lm_norm = 0.0 if g_lm is None else float(g_lm.abs().sum())
        kl_norm = 0.0 if g_kl is None else float(g_kl.abs().sum())
        if is_indexer:
            assert lm_norm == 0.0, f"LM loss reached indexer parameter {name}"
        else:
            assert kl_norm == 0.0, f"indexer KL reached model parameter {name}"
    assert any(".indexer." in n and g is not None and g.abs().sum() > 0 for n, g in zip(params, kl_grads))


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_warmup_stage_is_dense_then_sparse(mode):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=0.25, sparse={"warmup_steps": 5, **SPARSE_MODES[mode]})
    tokens = torch.randint(0, 50, (2, 64))
    model.set_training_step(0)
    _, aux = model(tokens)
    dsa = next(model.sparse_layers())
    assert dsa.last_stats["keep_ratio"] == 1.0 and aux["indexer_kl"] > 0
    model.set_training_step(5)
    model(tokens)
    assert dsa.last_stats["keep_ratio"] < 0.6


def test_fixed_keep_ratio_matches_formula():
    L, keep = 64, 0.25
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=keep, sparse={"warmup_steps": 0})
    model(torch.randint(0, 50, (2, L)))
    k = math.ceil(keep * L)
    expected = sum(min(k, t + 1) for t in range(L)) / (L * (L + 1) / 2)
    stats = next(model.sparse_layers()).last_stats
    assert abs(float(stats["keep_ratio"]) - expected) < 1e-9
    assert float(stats["keep_mean"]) == keep


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5])
def test_fixed_block_budget_attends_the_pairs_of_its_keep(keep):
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=keep, sparse={"warmup_steps": 0, **SPARSE_MODES["block"]})
    model(torch.randint(0, 50, (2, 45)))
    assert abs(float(next(model.sparse_layers()).last_stats["keep_mean"]) - keep) < 1e-12


def test_block_kl_target_matches_a_dense_computation():
    from adaptive_attn.sparse import losses

    B, H, L, D, block, qblock = 2, 3, 300, 8, 4, 8
    q, kv = torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    idx = random_block_selection(B, L, 5, block, qblock)
    n_qb = idx.shape[1]
    scores = torch.randn(B, n_qb, n_qb * 2, dtype=torch.float64)
    got = losses.block_kl_selected(q, kv, scores, idx, scale=0.4, block_size=block, query_block=qblock)

    from adaptive_attn.ops.sparse_attention import selection_mask

    mask = selection_mask(idx, L, block, qblock)
    probs = (torch.einsum("bhld,bsd->bhls", q, kv) * 0.4).masked_fill(~mask[:, None], float("-inf")).softmax(-1).mean(1)
    total, rows = 0.0, 0
    for b in range(B):
        for qb in range(n_qb):
            chosen = idx[b, qb][idx[b, qb] >= 0]
            if not len(chosen):
                continue
            rows_q = slice(qb * qblock, min(L, (qb + 1) * qblock))
            mass = torch.stack([probs[b, rows_q, c * block : (c + 1) * block].sum() for c in chosen])
            p = mass / mass.sum()
            log_q = scores[b, qb, chosen].log_softmax(-1)
            total += float((p * (p.log() - log_q)).sum())
            rows += 1
    assert abs(float(got) - total / rows) < 1e-9
