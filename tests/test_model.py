import torch

from adaptive_attn.model.llm import DenseMoELLM, FixedSparseMoELLM
from adaptive_attn.model.mla import MultiHeadLatentAttention
from adaptive_attn.model.moe import DeepSeekMoE
from adaptive_attn.nn.rope import RotaryEmbedding, apply_rope
from tests.helpers import assert_causal, tiny_model_kwargs


def test_mla_expanded_and_absorbed_paths_agree():
    mla = MultiHeadLatentAttention(d_model=48, n_heads=4, head_dim=12, rope_dim=8, v_head_dim=10, kv_rank=20).double()
    x = torch.randn(3, 37, 48, dtype=torch.float64)
    cos, sin = RotaryEmbedding(8)(37, torch.float64)
    parts = mla.project(x, cos, sin)
    expanded = mla.expanded_attention(*parts)
    absorbed = mla.up_project(mla.absorbed_attention(*mla.absorb(*parts)))
    assert expanded.shape == absorbed.shape == (3, 4, 37, 10)
    assert (expanded - absorbed).abs().max() < 1e-9


def test_rope_tables_are_computed_once_and_serve_training_after_validation():
    rope = RotaryEmbedding(8)
    with torch.inference_mode():  # Lightning validates in inference mode by default
        cos, sin = rope(10, torch.float32)
    assert rope(10, torch.float32)[0] is cos  # cached
    assert torch.allclose(cos[3, 1], torch.tensor(3 * 10000 ** (-2 / 8)).cos())
    x = torch.randn(2, 10, 8, requires_grad=True)
    apply_rope(x, *rope(10, torch.float32)).sum().backward()
    assert x.grad is not None and not cos.is_inference()


def test_low_rank_query_mla_runs_and_is_causal():
    assert_causal(DenseMoELLM(**tiny_model_kwargs(q_rank=16)).double(), seq_len=24)


def test_every_parameter_gets_a_gradient():
    for model in (
        DenseMoELLM(**tiny_model_kwargs()),
        FixedSparseMoELLM(**tiny_model_kwargs(), sparse={}),
    ):
        tokens = torch.randint(0, 50, (4, 32))
        logits, aux = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss = loss + aux["balance_loss"] + aux.get("indexer_kl", 0.0)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing


def expert_load_spread(moe: DeepSeekMoE, x: torch.Tensor, steps: int) -> float:
    """Coefficient of variation of tokens per expert after `steps` bias updates on a fixed batch."""
    moe.train()
    for _ in range(steps):
        with torch.no_grad():
            moe(x)
        moe.update_router_bias()
    with torch.no_grad():
        moe(x)
    load = moe.last_load
    return float(load.std() / load.mean())


def test_aux_free_bias_evens_expert_load():
    shared_direction = torch.randn(32)
    x = torch.randn(8, 64, 32) + shared_direction

    def skewed_moe(rate):
        torch.manual_seed(1)
        moe = DeepSeekMoE(32, n_routed=8, n_shared=1, top_k=2, d_ff_expert=16, bias_update_rate=rate)
        with torch.no_grad():
            moe.router.weight[:2] += 0.2 * shared_direction  # experts 0 and 1 attract most tokens
        return moe

    unbalanced = expert_load_spread(skewed_moe(0.0), x, steps=200)
    balanced = expert_load_spread(skewed_moe(0.01), x, steps=200)
    assert unbalanced > 0.5
    assert balanced < 0.5 * unbalanced


def test_moe_output_of_a_token_ignores_other_tokens():
    moe = DeepSeekMoE(16, n_routed=4, top_k=2, d_ff_expert=8).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64)
    y, _ = moe(x)
    y_alone, _ = moe(x[:, 3:4])
    assert torch.allclose(y[:, 3], y_alone[:, 0], atol=1e-12)


def test_moe_output_is_each_tokens_gated_experts_plus_the_shared_one():
    torch.manual_seed(0)
    moe = DeepSeekMoE(16, n_routed=4, top_k=2, d_ff_expert=8).double()
    moe.router_bias[3] = -10.0  # expert 3 gets no token: an empty slice
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, _ = moe(x)
    flat, y = x.reshape(-1, 16), y.reshape(-1, 16)
    affinity = torch.sigmoid(moe.router(flat))
    chosen = torch.topk(affinity + moe.router_bias, 2, dim=-1).indices
    assert not (chosen == 3).any()
    for t, token in enumerate(flat[:, None]):
        gates = affinity[t, chosen[t]] / affinity[t, chosen[t]].sum()
        routed = sum(g * moe.experts[int(e)](token) for g, e in zip(gates, chosen[t]))
        assert torch.allclose(y[t], (moe.shared(token) + routed)[0], atol=1e-12)
