"""The fused Triton token-level kernel against the reference backend (CPU: TRITON_INTERPRET=1)."""

import pytest
import torch

pytest.importorskip("triton")

from adaptive_attn.ops.dispatch import sparse_attention  # noqa: E402
from adaptive_attn.ops.layout import SparseLayout  # noqa: E402
from tests.helpers import assert_backends_agree, assert_causal, attention_and_grads, random_selection  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def token_selection(B, L, k, per_row=False):
    idx, layout = random_selection(B, L, k, per_row=per_row)
    return idx.to(DEVICE), SparseLayout.build(L, 1, 1, torch.device(DEVICE))


@pytest.mark.parametrize(
    "L,k,H,D,v_dim,biased", [(19, 6, 3, 20, 12, False), (48, 40, 2, 16, 16, True), (33, 8, 5, 24, 8, True)]
)
def test_triton_token_kernel_matches_reference(L, k, H, D, v_dim, biased):
    B = 2
    q = torch.randn(B, H, L, D, device=DEVICE, requires_grad=True)
    kv = torch.randn(B, L, D, device=DEVICE, requires_grad=True)
    idx, layout = token_selection(B, L, k, per_row=True)  # per-query k, -1 slots
    idx[0, :, 2:] = -1  # one sequence with a tiny k
    bias = torch.randn(idx.shape, device=DEVICE).requires_grad_() if biased else None
    ref = attention_and_grads("reference", q, kv, idx, layout, bias, v_dim=v_dim, scale=0.35)
    got = attention_and_grads("triton", q, kv, idx, layout, bias, v_dim=v_dim, scale=0.35)
    assert_backends_agree(ref, got, tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_token_kernel_in_half_precision_matches_float32_reference(dtype):
    """The GPU runs in bf16: the kernel's casts, stores and float32 accumulators against the float32
    reference on the same rounded inputs (the CPU interpreter computes no bf16, so there float16 only)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter does not compute in bfloat16")
    B, H, L, D, v_dim = 2, 4, 40, 32, 24
    q = torch.randn(B, H, L, D, device=DEVICE).to(dtype)
    kv = torch.randn(B, L, D, device=DEVICE).to(dtype)
    bias = torch.randn(B, L, 12, device=DEVICE).to(dtype)
    idx, layout = token_selection(B, L, 12, per_row=True)
    low = [t.clone().requires_grad_() for t in (q, kv, bias)]
    ref = attention_and_grads(
        "reference",
        *(t.float().requires_grad_() for t in (q, kv)),
        idx,
        layout,
        bias.float().requires_grad_(),
        v_dim=v_dim,
        scale=0.35,
    )
    got = attention_and_grads("triton", low[0], low[1], idx, layout, low[2], v_dim=v_dim, scale=0.35)
    for name, value in got.items():
        assert value.dtype == (torch.float32 if name == "slot_probs" else dtype), name
    assert_backends_agree(ref, got, tol=2e-2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sparse_attention_takes_queries_and_rows_of_different_dtypes(backend):
    """Under autocast the absorbed queries and the latent rows can come in different dtypes."""
    q, kv = torch.randn(1, 2, 24, 16, device=DEVICE), torch.randn(1, 24, 16, device=DEVICE)
    idx, layout = token_selection(1, 24, 5)
    same, _ = sparse_attention(q, kv, idx, layout, scale=0.3, v_dim=8, backend=backend)
    mixed, _ = sparse_attention(q.half(), kv, idx, layout, scale=0.3, v_dim=8, backend=backend)
    assert mixed.dtype == torch.float32 and (mixed - same).abs().max() < 1e-2


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_sparse_attention_runs_in_the_autocast_dtype(backend):
    """Under autocast the kernels get its dtype, as dense SDPA does (the CPU interpreter: float16)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    if backend != "triton" and DEVICE == "cpu":
        dtype = torch.bfloat16  # CPU matmuls in float16 are slow and some are missing
    q, kv = torch.randn(2, 4, 40, 32, device=DEVICE), torch.randn(2, 40, 32, device=DEVICE)
    idx, layout = token_selection(2, 40, 12)
    full, _ = sparse_attention(q, kv, idx, layout, scale=0.3, v_dim=24, backend=backend)
    with torch.autocast(DEVICE, dtype=dtype):
        low, _ = sparse_attention(q, kv, idx, layout, scale=0.3, v_dim=24, backend=backend)
    assert low.dtype == dtype and ((low.float() - full).abs().max() / full.abs().max()) < 2e-2


def test_triton_backend_inside_a_model_is_causal():
    from adaptive_attn.model.llm import FixedSparseMoELLM
    from tests.helpers import tiny_model_kwargs

    sparse = {"backend": "triton"}
    model = FixedSparseMoELLM(**tiny_model_kwargs(), keep=0.25, sparse=sparse).to(DEVICE)
    if DEVICE == "cpu":
        assert_causal(model, 24, cuts=(11,))
        return
    # cuBLAS picks its GEMM kernels by the rows an expert gets, which future tokens change: last bits
    tokens = torch.randint(0, 50, (1, 24), device=DEVICE)
    with torch.no_grad():
        base, _ = model(tokens)
        changed = tokens.clone()
        changed[:, 12:] = torch.randint(0, 50, (1, 12), device=DEVICE)
        out, _ = model(changed)
    assert (out[:, :12] - base[:, :12]).abs().max() < 1e-4 * base.abs().max()
    assert not torch.equal(out[:, 12:], base[:, 12:])


# blocks in whole tiles of 16, as FlexAttention's compiled GPU kernels need
@pytest.mark.parametrize("L,block,qblock,kb", [(96, 16, 16, 3), (100, 16, 32, 2), (256, 32, 64, 3)])
def test_flex_block_forward_matches_reference(L, block, qblock, kb):
    B, H, D, v = 2, 3, 16, 8
    q, kv = torch.randn(B, H, L, D, device=DEVICE), torch.randn(B, L, D, device=DEVICE)
    idx, _ = random_selection(B, L, kb, block, qblock)
    idx, layout = idx.to(DEVICE), SparseLayout.build(L, block, qblock, torch.device(DEVICE))
    with torch.no_grad():
        ref, _ = sparse_attention(q, kv, idx, layout, backend="reference", scale=0.3, v_dim=v)
        got, _ = sparse_attention(q, kv, idx, layout, backend="flex", scale=0.3, v_dim=v)
    assert ((ref - got).abs().max() / ref.abs().max()) < 1e-4
