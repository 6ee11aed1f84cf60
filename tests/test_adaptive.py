import json
from functools import partial
from pathlib import Path

import pytest
import torch

from adaptive_attn.data.mqar import MQARDataset
from adaptive_attn.model.llm import AdaptiveMoELLM
from adaptive_attn.ops.sparse_attention import sparse_attention
from adaptive_attn.sparse.budget import AdaptiveTopP
from adaptive_attn.sparse.controller import (
    AttentionEntropyEstimator,
    ContentComplexityAnalyzer,
    DynamicSparsityController,
    prefix_sums_at,
)
from adaptive_attn.train import run
from tests.conftest import tiny_model_kwargs
from tests.test_model import assert_causal
from tests.test_sparse import SPARSE_MODES, _grads, random_block_selection, random_token_selection

BUDGETS = {
    "adaptive": partial(DynamicSparsityController, target=0.25, reference_len=64),
    "adaptive_per_query": partial(DynamicSparsityController, target=0.25, reference_len=64, query_stride=1),
    "adaptive_topp": partial(AdaptiveTopP, target=0.25),
}


def adaptive_model(budget="adaptive", mode="token", **kwargs):
    return AdaptiveMoELLM(
        **tiny_model_kwargs(**kwargs), budget=BUDGETS[budget], sparse={"warmup_steps": 0, **SPARSE_MODES[mode]}
    )


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("mode", SPARSE_MODES)
@pytest.mark.parametrize("seq_len", [16, 45, 80])
def test_adaptive_models_are_causal(budget, mode, seq_len):
    assert_causal(adaptive_model(budget, mode).double(), seq_len)


def test_controller_features_are_prefix_statistics():
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 12:] = torch.randn(2, 18, 16, dtype=torch.float64)
    a, b = ContentComplexityAnalyzer()(x), ContentComplexityAnalyzer()(changed)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.equal(a[:, 12:], b[:, 12:])
    scores = torch.randn(2, 30, 30).masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
    entropy = AttentionEntropyEstimator()(scores)
    assert entropy[:, 0].eq(0).all() and ((entropy >= 0) & (entropy <= 1 + 1e-6)).all()
    assert torch.equal(AttentionEntropyEstimator()(scores, torch.arange(1, 31)), entropy)
    uniform = AttentionEntropyEstimator()(torch.zeros(1, 1, 8))
    assert torch.allclose(uniform, torch.ones(1, 1))


def test_prefix_sums_at_positions_equal_running_sums_there():
    x = torch.randn(3, 50, 4, dtype=torch.float64)
    for positions in (torch.arange(50), torch.arange(0, 50, 16), torch.tensor([0, 3, 4, 20, 49]), torch.tensor([7])):
        (sums,) = prefix_sums_at(positions, x)
        assert torch.allclose(sums, x.cumsum(1)[:, positions], atol=1e-12)


def test_controller_decides_once_per_query_group_by_its_first_query():
    x = torch.randn(2, 40, 16)
    scores = torch.randn(2, 40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    rows = dict(positions=torch.arange(40), n_eligible=torch.arange(1, 41))
    per_query = DynamicSparsityController(query_stride=1)
    grouped = DynamicSparsityController(query_stride=16)
    grouped.load_state_dict(per_query.state_dict())
    k1, k16 = per_query(x, scores, **rows), grouped(x, scores, **rows)
    first = (torch.arange(40) // 16) * 16
    assert torch.allclose(k16, k1[:, first])
    assert k1.unique().numel() > 3  # per query, the budgets do differ


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_controller_parameters_learn_from_the_lm_loss(mode):
    model = adaptive_model("adaptive", mode)
    tokens = torch.randint(0, 50, (4, 64))
    logits, _ = model(tokens)  # LM loss only: the KL never reaches the controller
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for dsa in model.sparse_layers():
        grads = [p.grad for p in dsa.budget.parameters()]
        assert grads and all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_soft_rank_mask_leaves_the_forward_pass_unchanged():
    model = adaptive_model("adaptive").double()
    tokens = torch.randint(0, 50, (2, 40))
    with_grad, _ = model(tokens)
    with torch.no_grad():
        without, _ = model(tokens)
    assert torch.equal(with_grad, without)


@pytest.mark.parametrize("L,k,per_query", [(40, 12, True), (130, 50, True)])
def test_biased_token_attention_matches_reference(L, k, per_query):
    B, H, D = 3, 2, 8
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_token_selection(B, L, k, per_query)
    idx[1, :, 3:] = -1  # sequence 1 uses fewer slots: processed on its own
    bias = torch.randn(idx.shape, dtype=torch.float64, requires_grad=True)
    res = {
        b: _grads(
            lambda q, kv, g: sparse_attention(q, kv, idx, scale=0.3, v_dim=5, backend=b, slot_bias=g)[0], q, kv, bias
        )
        for b in ("reference", "torch")
    }
    for a, c in zip(res["reference"], res["torch"]):
        assert (a - c).abs().max() < 1e-9


def test_biased_block_attention_matches_reference():
    B, H, L, D, block, qblock = 3, 2, 96, 8, 8, 16
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    idx = random_block_selection(B, L, 4, block, qblock)
    idx[2, :, 1:] = -1  # a sequence with a smaller k
    bias = torch.randn(idx.shape, dtype=torch.float64, requires_grad=True)
    layout = dict(block_size=block, query_block=qblock)
    res = {
        b: _grads(
            lambda q, kv, g: sparse_attention(q, kv, idx, scale=0.3, v_dim=5, backend=b, slot_bias=g, **layout)[0],
            q,
            kv,
            bias,
        )
        for b in ("reference", "torch")
    }
    for a, c in zip(res["reference"], res["torch"]):
        assert (a - c).abs().max() < 1e-9


def test_sequences_of_different_difficulty_get_different_k():
    ds = MQARDataset(num_samples=64, seq_len=64, vocab_size=50, min_pairs=2, max_pairs=16, seed=0)
    items = sorted((ds[i] for i in range(64)), key=lambda it: int(it["n_pairs"]))
    batch = torch.stack([items[0]["tokens"][:-1], items[-1]["tokens"][:-1]])  # easiest and hardest
    model = adaptive_model("adaptive")
    model(batch)
    k = next(model.sparse_layers()).last_stats["k_per_sequence"]
    assert k.shape == (2,) and k[0] != k[1]


@pytest.mark.parametrize(
    "model_name,extra",
    [("adaptive", []), ("adaptive_topp", []), ("adaptive", ["model.sparse.block_size=8"])],
)
def test_short_run_holds_mean_keep_at_target(compose_cfg, model_name, extra):
    cfg = compose_cfg(
        [
            *extra,
            "experiment=quick",
            f"model={model_name}",
            "model.sparse.warmup_steps=0",
            "data=mqar",
            "trainer.max_steps=40",
            "trainer.val_check_interval=40",
            "model.budget.target=0.3",
        ]
    )
    run(cfg)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["target"] == 0.3
    assert abs(summary["keep_mean"] - 0.3) <= 0.02, summary["keep_mean"]  # the compute of fixed keep 0.3


def test_top_p_keeps_fewer_positions_where_the_indexer_is_confident():
    flat = torch.zeros(1, 1, 100)
    peaked = torch.zeros(1, 1, 100)
    peaked[..., :3] = 10.0
    budget = AdaptiveTopP(target=0.25, p_init=0.9)
    k = budget(None, torch.cat([flat, peaked], dim=0))
    assert k[0, 0] == 90 and k[1, 0] == 3
    budget.after_step(0.5)  # above target -> p falls
    assert budget.p < 0.9


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_float32_rank_bias_drives_bfloat16_attention(mode):
    layout = {"block_size": 1, "query_block": 1, **SPARSE_MODES[mode]}
    B, H, L, D = 2, 3, 40, 8
    q = torch.randn(B, H, L, D, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(B, L, D, dtype=torch.bfloat16, requires_grad=True)
    if mode == "token":
        idx = random_token_selection(B, L, 10, per_query=True)
    else:
        idx = random_block_selection(B, L, 2, layout["block_size"], layout["query_block"])
    bias = torch.zeros(idx.shape, requires_grad=True)  # the controller's soft rank mask stays float32
    out, _ = sparse_attention(q, kv, idx, scale=0.3, v_dim=D, backend="torch", slot_bias=bias, **layout)
    out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32 and bias.grad.abs().sum() > 0
