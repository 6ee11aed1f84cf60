"""Adaptive budgets: the controller's prefix features, its gradient, its compute held at the target; top-p."""

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from adaptive_attn.lit.module import SparseLMModule
from adaptive_attn.model.llm import AdaptiveMoELLM
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.runner import run
from adaptive_attn.sparse.budget import AdaptiveTopP
from adaptive_attn.sparse.controller import (
    FEATURES,
    AttentionEntropyEstimator,
    ContentComplexityAnalyzer,
    DynamicSparsityController,
    prefix_sums_at,
)
from tests.helpers import tiny_model_kwargs

SPARSE_MODES = {"token": {}, "block": {"block_size": 4, "query_block": 8}}


def adaptive_model(mode="token", rank_row_fraction=1.0, **kwargs):
    budget = partial(DynamicSparsityController, target=0.25, reference_len=64)
    sparse = {**SPARSE_MODES[mode], "rank_row_fraction": rank_row_fraction}
    return AdaptiveMoELLM(**tiny_model_kwargs(**kwargs), budget=budget, sparse=sparse)


def causal_scores(B, L):
    return torch.randn(B, L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))


def test_controller_features_are_prefix_statistics():
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    changed = x.clone()
    changed[:, 12:] = torch.randn(2, 18, 16, dtype=torch.float64)
    a, b = ContentComplexityAnalyzer()(x), ContentComplexityAnalyzer()(changed)
    assert torch.equal(a[:, :12], b[:, :12]) and not torch.equal(a[:, 12:], b[:, 12:])
    scores = causal_scores(2, 30)
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
    x, scores, layout = torch.randn(2, 40, 16), causal_scores(2, 40), SparseLayout(40)
    per_query = DynamicSparsityController(query_stride=1)
    grouped = DynamicSparsityController(query_stride=16)
    grouped.load_state_dict(per_query.state_dict())
    k1, k16 = per_query(x, scores, layout), grouped(x, scores, layout)
    first = (torch.arange(40) // 16) * 16
    assert torch.allclose(k16, k1[:, first])
    assert not torch.allclose(k16, k1)  # the groups' other queries would have decided otherwise


def test_controller_gives_more_keys_to_more_varied_content():
    """With its prior weights (more diverse, less predictable, more varied content -> more keys), a
    sequence of one repeated hidden state gets a smaller k than one of random states, at every row."""
    L, layout = 64, SparseLayout(64)
    repeated = torch.randn(1, 1, 16).expand(1, L, 16)
    varied = torch.randn(1, L, 16)
    scores = causal_scores(1, L).expand(2, -1, -1)  # the same indexer scores for both
    k = DynamicSparsityController(query_stride=1, reference_len=L)(torch.cat([repeated, varied]), scores, layout)
    assert (k[0, 1:] < k[1, 1:]).all()


@pytest.mark.parametrize("mode", SPARSE_MODES)
def test_controller_parameters_learn_from_the_lm_loss(mode):
    model = adaptive_model(mode)
    tokens = torch.randint(0, 50, (4, 64))
    logits, _ = model(tokens)  # LM loss only: the KL never reaches the controller
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    for dsa in model.sparse_layers():
        grads = [p.grad for p in dsa.budget.parameters()]
        assert grads and all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_controller_stats_report_its_learned_weights():
    """The logged weights start at the prior (1 per feature) and follow the parameters once the LM loss has
    moved them, so a run's metrics show whether k's policy was learned."""
    model = adaptive_model()
    controller = next(iter(model.sparse_layers())).budget
    model(torch.randint(0, 50, (2, 64)))
    assert all(float(controller.stats()[f"weight_{name}"]) == 1.0 for name in FEATURES)
    tokens = torch.randint(0, 50, (4, 64))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    torch.optim.SGD(controller.parameters(), lr=10.0).step()
    stats = controller.stats()
    assert [float(stats[f"weight_{name}"]) for name in FEATURES] == controller.calculator.weight.tolist()
    assert any(float(stats[f"weight_{name}"]) != 1.0 for name in FEATURES)
    assert float(stats["weight_bias"]) == float(controller.calculator.bias.detach())


def test_controller_trains_at_its_own_learning_rate():
    """`lr_scale` gives the controllers' parameters, and only them, lr * lr_scale (no weight decay); every
    parameter is in exactly one group."""
    budget = partial(DynamicSparsityController, target=0.25, lr_scale=30.0)
    model = AdaptiveMoELLM(**tiny_model_kwargs(), budget=budget, sparse={})
    module = SparseLMModule(model, lr=1e-3, lr_warmup_steps=0)
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    groups = module.configure_optimizers()["optimizer"].param_groups
    controller_params = {id(p) for dsa in model.sparse_layers() for p in dsa.budget.parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    for g in groups:
        own = {id(p) in controller_params for p in g["params"]}
        assert len(own) == 1
        if own == {True}:
            assert g["lr"] == pytest.approx(30 * 1e-3) and g["weight_decay"] == 0.0
        else:
            assert g["lr"] == pytest.approx(1e-3)


def test_without_learn_level_the_loss_trains_where_k_goes_around_running_feature_means():
    """learn_level=False: the bias is no parameter (the dual ascent alone sets k's level), the weights still
    learn, and the features are centred at running means that move towards each step's means."""
    budget = partial(DynamicSparsityController, target=0.25, reference_len=64, learn_level=False)
    model = AdaptiveMoELLM(**tiny_model_kwargs(), budget=budget, sparse={})
    controller = next(iter(model.sparse_layers())).budget
    calculator = controller.calculator
    assert [name for name, _ in controller.named_parameters()] == ["calculator.weight"]
    tokens = torch.randint(0, 50, (4, 64))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert float(calculator.weight.grad.abs().sum()) > 0
    means = controller.feature_means
    before = calculator.centre.clone()
    controller.update(0.25)
    assert torch.allclose(calculator.centre, before + calculator.centre_momentum * (means - before))


def test_soft_rank_mask_leaves_the_forward_pass_unchanged():
    model = adaptive_model().double()
    tokens = torch.randint(0, 50, (2, 40))
    with_grad, _ = model(tokens)
    with torch.no_grad():
        without, _ = model(tokens)
    assert torch.equal(with_grad, without)


@pytest.mark.parametrize(
    "model_name,extra",
    [
        ("adaptive", []),
        ("adaptive_topp", []),
        ("adaptive", ["model.sparse.block_size=8"]),
        ("oracle", []),
        ("shuffled", ["data.batch_size=8"]),
        ("adaptive10_lr30", []),
    ],
)
def test_short_run_holds_the_equivalent_keep_at_target(compose_cfg, model_name, extra):
    cfg = compose_cfg(
        [
            *extra,
            "experiment=quick",
            f"model={model_name}",
            "module.dense_warmup_steps=0",
            "data=mqar",
            "trainer.max_steps=40",
            "trainer.val_check_interval=40",
            "model.budget.target=0.3",
        ]
    )
    run(cfg)
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["target"] == 0.3
    assert abs(summary["equivalent_keep"] - 0.3) <= 0.02, summary["equivalent_keep"]  # fixed keep 0.3's compute


def test_top_p_keeps_fewer_positions_where_the_indexer_is_confident():
    flat = torch.zeros(1, 1, 100)
    peaked = torch.zeros(1, 1, 100)
    peaked[..., :3] = 10.0
    budget = AdaptiveTopP(target=0.25, p_init=0.9)
    k = budget(None, torch.cat([flat, peaked], dim=0), SparseLayout(100))
    assert k[0, 0] == 90 and k[1, 0] == 3
    budget.update(0.5)  # above target -> p falls
    lowered = float(budget.p)
    assert lowered < 0.9
    budget.update(0.0)  # below target -> p rises
    assert budget.p > lowered


def test_rank_mask_gradient_from_a_draw_of_query_blocks_is_unbiased():
    """Block mode: the controller's gradient from a draw of a quarter of the query blocks averages to the
    gradient from all of them (within three standard errors), and single draws differ."""
    torch.manual_seed(0)
    model = adaptive_model("block", n_layers=1).double()
    tokens = torch.randint(0, 50, (4, 96))

    def controller_grad(fraction: float) -> torch.Tensor:
        for dsa in model.sparse_layers():
            dsa.rank_row_fraction = fraction
        model.zero_grad()
        logits, _ = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        return torch.cat([p.grad.flatten() for p in next(model.sparse_layers()).budget.parameters()])

    full = controller_grad(1.0)
    draws = torch.stack([controller_grad(0.25) for _ in range(150)])
    error = (draws.mean(0) - full).abs()
    standard_error = draws.std(0) / len(draws) ** 0.5
    assert (draws.std(0) > 0).any() and (error <= 3 * standard_error + 1e-12).all()


def train_steps(model, tokens, evaluate_between: bool) -> None:
    """Three SGD steps of the sparse stage on `tokens`; with `evaluate_between`, an evaluation pass (its
    recall diagnostic draws a random control) and a global-RNG draw (as a data loader's) before each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        if evaluate_between:
            model.eval()
            with torch.no_grad():
                model(tokens)
            torch.rand(5)
            model.train()
        logits, aux = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux["indexer_kl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_training_step(aux["sparsity"])


def test_training_draws_are_the_layers_own_so_evaluation_in_between_changes_no_bit():
    """Block mode draws query blocks for the rank mask's gradient (`draw_rows`) from each layer's own stream:
    evaluation (whose random control draws from another) and other users of the global RNG between the
    training steps leave the trained weights bit for bit as they were; another seed draws other blocks."""
    tokens = torch.randint(0, 50, (2, 64))
    weights = []
    for evaluate_between, seed in ((False, 0), (True, 0), (False, 1)):
        torch.manual_seed(0)
        model = adaptive_model("block", rank_row_fraction=0.25)
        for i, dsa in enumerate(model.sparse_layers()):
            dsa.seed_draws(seed + i)
        train_steps(model, tokens, evaluate_between)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_a_checkpoint_carries_the_layers_draws():
    """The draw states go into a checkpoint and come back from it: a model resumed from them draws what the
    uninterrupted one draws."""
    torch.manual_seed(0)
    model = adaptive_model("block")
    module = SparseLMModule(model)
    saved = {}
    module.on_save_checkpoint(saved)
    layers = list(model.sparse_layers())
    assert len(saved["draw_states"]) == len(layers) == 2
    ahead = [torch.randint(1000, (4,), generator=dsa.draws) for dsa in layers]
    module.on_load_checkpoint(saved)
    assert all(torch.equal(torch.randint(1000, (4,), generator=dsa.draws), a) for dsa, a in zip(layers, ahead))
    assert not torch.equal(ahead[0], ahead[1])  # each layer its own stream
