"""Whole-model causality for every model config, in float64: changing tokens after position t must leave
the logits at positions <= t bit-identical, in training and evaluation mode.

Sparse models run in their sparse stage. Budgets set k per row (adaptive: per query group, or per query).
A second, "confident" indexer has one head (about half of its ReLU outputs are exact zeros, so scores
tie) and head weights 10x larger (a peaked distribution, as a trained indexer's; top-p budgets then vary
per row): the selection among equal scores is exercised as well as the budgets that set how many are taken.
"""

import pytest
import torch
from hydra.utils import instantiate

from adaptive_attn.config import group_options
from tests.helpers import assert_causal

TINY = [
    "data=mqar",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.rope_dim=4",
    "model.kv_rank=16",
    "model.moe.n_routed=4",
    "model.moe.d_ff_expert=32",
]
SPARSE_MODELS = [m for m in group_options("model") if m != "dense"]
BLOCKS = ["model.sparse.block_size=4", "model.sparse.query_block=8"]
MODES = {"token": [], "block": BLOCKS, "block_sdpa": [*BLOCKS, "model.sparse.backend=torch"]}  # auto: `cpu` kernel
INDEXERS = {"default": ([], 1.0), "confident": (["model.sparse.indexer.n_heads=1"], 10.0)}


def sparse_stage_model(compose_cfg, overrides, indexer="default"):
    extra, weight_scale = INDEXERS[indexer]
    cfg = compose_cfg([*TINY, *overrides, *extra])
    model = instantiate(cfg.model).double()
    with torch.no_grad():
        for dsa in model.sparse_layers():
            dsa.indexer.w_proj.weight.mul_(weight_scale)
    return model, cfg.model.vocab_size


@pytest.mark.parametrize("indexer", INDEXERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SPARSE_MODELS)
def test_every_sparse_model_is_causal_in_its_sparse_stage(compose_cfg, name, mode, indexer):
    model, vocab = sparse_stage_model(compose_cfg, [f"model={name}", *MODES[mode]], indexer)
    for seq_len in (8, 37, 128):
        assert_causal(model, seq_len, vocab)


def test_per_query_adaptive_budget_is_causal(compose_cfg):
    model, vocab = sparse_stage_model(compose_cfg, ["model=adaptive", "model.budget.query_stride=1"], "confident")
    assert_causal(model, 80, vocab)


def test_dense_model_is_causal(compose_cfg):
    model, vocab = sparse_stage_model(compose_cfg, ["model=dense"])
    assert_causal(model, 40, vocab)


@pytest.mark.parametrize("name", ["fixed25", "adaptive"])
@pytest.mark.parametrize("mode", MODES)
def test_short_conv_and_attention_sinks_keep_models_causal(compose_cfg, name, mode):
    options = ["model.short_conv=4", "model.sparse.sink_tokens=3"]
    model, vocab = sparse_stage_model(compose_cfg, [f"model={name}", *MODES[mode], *options], "confident")
    assert_causal(model, 64, vocab)
