"""The `cpu` backend (the torch backend's rows in the C++ kernel of `block_kernel`) against the dense masked
reference, in float64: outputs, gradients, the slot bias's gradient and each selected block's mass."""

import shutil

import pytest
import torch

from adaptive_attn.ops import block_kernel
from adaptive_attn.ops.dispatch import sparse_attention
from adaptive_attn.sparse import losses
from tests.helpers import BLOCK_CASES, assert_backends_agree, attention_and_grads, float64_inputs, random_selection

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="the cpu backend's kernel needs a C++ compiler")


def test_the_kernel_builds_here_and_takes_float_cpu_tensors_only():
    assert block_kernel.kernel() is not None
    assert block_kernel.takes(torch.zeros(1)) and block_kernel.takes(torch.zeros(1, dtype=torch.float64))
    assert not block_kernel.takes(torch.zeros(1, dtype=torch.bfloat16))


@pytest.mark.parametrize("L,block,qblock,kb", BLOCK_CASES)
@pytest.mark.parametrize("per_row", [False, True])  # every slot in use; rows with unused slots
@pytest.mark.parametrize("biased", [False, True])
def test_cpu_backend_equals_reference(L, block, qblock, kb, per_row, biased):
    idx, layout = random_selection(2, L, max(kb, 1) if per_row else kb, block, qblock, per_row=per_row)
    biased = biased and idx.shape[-1] > 0  # no slot to bias where no row selects
    q, latents, bias = float64_inputs(2, 3, L, 10, idx.shape if biased else None)
    ref = attention_and_grads("reference", q, latents, idx, layout, bias)
    got = attention_and_grads("cpu", q, latents, idx, layout, bias)
    assert_backends_agree(ref, got)
    assert not biased or ref["dbias"].abs().max() > 0.01


def test_cpu_backend_calls_no_sdpa(monkeypatch):
    """Every call, the whole-past prefix's too, runs in the kernel."""
    idx, layout = random_selection(2, 128, 4, 8, 16, per_row=True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)
    q, latents, _ = float64_inputs(2, 3, 128, 10)
    out, mass = sparse_attention(q, latents, idx, layout, scale=0.3, v_dim=6, backend="cpu")
    out.sum().backward()
    assert q.grad.abs().sum() > 0 and mass is not None


@pytest.mark.parametrize(
    "L,block,qblock,kb,per_row", [(96, 8, 16, 4, False), (100, 4, 8, 4, True), (300, 2, 8, 5, False)]
)
def test_cpu_backend_returns_every_selected_blocks_attention_mass(L, block, qblock, kb, per_row):
    """Whatever the key width, each selected block's mass in every row (the whole-past prefix's too) equals a
    separate computation of it (`losses.block_mass`)."""
    idx, layout = random_selection(2, L, kb, block, qblock, per_row=per_row)
    q, latents, _ = float64_inputs(2, 3, L, 7)
    _, mass = sparse_attention(q, latents, idx, layout, scale=0.3, v_dim=6, backend="cpu")
    padded_q, padded_latents = layout.pad(q.detach(), 2), layout.pad(latents.detach(), 1)
    expected = losses.block_mass(padded_q, padded_latents, idx, layout, 0, layout.n_rows, 0.3) * (idx >= 0)
    assert not mass.isnan().any() and (mass - expected).abs().max() < 1e-10


def test_float32_cpu_backend_agrees_with_sdpa_and_bfloat16_runs_the_torch_backend():
    idx, layout = random_selection(2, 256, 6, 16, 32, per_row=True)
    q, latents = torch.randn(2, 4, 256, 24), torch.randn(2, 256, 24)
    fused, _ = sparse_attention(q, latents, idx, layout, scale=0.2, v_dim=16, backend="cpu")
    sdpa, _ = sparse_attention(q, latents, idx, layout, scale=0.2, v_dim=16, backend="torch")
    assert (fused - sdpa).abs().max() < 1e-5
    low, _ = sparse_attention(q.bfloat16(), latents.bfloat16(), idx, layout, scale=0.2, v_dim=16, backend="cpu")
    assert low.dtype == torch.bfloat16 and (low.float() - sdpa).abs().max() < 0.1
