"""Every sparse attention backend against the dense masked reference, in float64: outputs and gradients."""

import pytest
import torch

from adaptive_attn.ops import sdpa_block, torch_block, torch_token
from adaptive_attn.ops.dispatch import resolve_backend, sparse_attention, triton_available
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.rows import permute_rows
from adaptive_attn.ops.torch_block import torch_block_attention
from adaptive_attn.ops.torch_token import torch_token_attention
from adaptive_attn.sparse import losses
from tests.helpers import (
    BLOCK_CASES,
    assert_backends_agree,
    attention_and_grads,
    cpu_threads,
    float64_inputs,
    random_selection,
)


def assert_equals_reference(backend, q, latents, idx, layout, bias=None, **kwargs):
    ref = attention_and_grads("reference", q, latents, idx, layout, bias)
    got = attention_and_grads(backend, q, latents, idx, layout, bias, **kwargs)
    assert_backends_agree(ref, got)


def test_permuted_rows_and_their_gradient_are_index_selects_bits():
    x = torch.randn(37, 3, 5, requires_grad=True)
    order = torch.randperm(37)
    grad = torch.randn(37, 3, 5)
    permuted = permute_rows(x, order, torch.argsort(order))
    (expected_grad,) = torch.autograd.grad(x.index_select(0, order), x, grad)
    (got_grad,) = torch.autograd.grad(permuted, x, grad)
    assert torch.equal(permuted, x.index_select(0, order))
    assert torch.equal(got_grad, expected_grad)
    assert torch.equal(permute_rows(x.detach(), order, torch.argsort(order)), x.detach()[order])


@pytest.mark.parametrize(
    "L,k,per_row", [(1, 1, False), (17, 5, False), (64, 16, True), (130, 200, False), (200, 40, True)]
)
def test_torch_token_backend_equals_reference(L, k, per_row):
    idx, layout = random_selection(2, L, k, per_row=per_row)
    q, latents, _ = float64_inputs(2, 3, L, 10)
    assert_equals_reference("torch", q, latents, idx, layout)


@pytest.mark.parametrize("max_chunk", [1, 3000, 2**22])
@pytest.mark.parametrize("gather_max", [1, 2**20])  # a gather per chunk; one for all
def test_torch_token_attention_in_several_query_chunks_equals_reference(monkeypatch, max_chunk, gather_max):
    monkeypatch.setattr(torch_token, "GATHER_MAX", gather_max)
    idx, layout = random_selection(2, 90, 40, per_row=True)  # widths of 8 to 40 slots
    q, latents, bias = float64_inputs(2, 3, 90, 10, idx.shape)
    assert_equals_reference(torch_token_attention, q, latents, idx, layout, bias, max_chunk=max_chunk)


@pytest.mark.parametrize("L,block,qblock,kb", BLOCK_CASES)
def test_torch_block_backend_equals_reference(L, block, qblock, kb):
    idx, layout = random_selection(2, L, kb, block, qblock)
    q, latents, _ = float64_inputs(2, 3, L, 10)
    assert_equals_reference("torch", q, latents, idx, layout)


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # SDPA's calls; the C++ kernel's (`block_kernel`)
def test_block_backend_with_per_sequence_budgets_equals_reference(backend):
    """Sequences whose budgets differ a lot go one by one, each with its own whole-past prefix."""
    idx, layout = random_selection(3, 96, torch.tensor([1, 6, 3]), 8, 8)
    q, latents, bias = float64_inputs(3, 2, 96, 8, idx.shape)
    assert_equals_reference(backend, q, latents, idx, layout)
    assert_equals_reference(backend, q, latents, idx, layout, bias)


def test_block_backend_takes_one_call_per_slot_width_across_sequences_and_positions(monkeypatch):
    """After the whole-past prefix (one causal call), rows of any sequence and position that share a slot
    width share one SDPA call; where some of a call's slots are unused, each query block gets its own mask
    (shared by its heads). One gather serves all the calls, so backward scatters into the latents once."""
    idx, layout = random_selection(3, 128, 4, 8, 16)  # query block r selects min(2r, 4) blocks
    idx[1, 5:, 3] = -1  # 3 blocks from query block 5 on in sequence 1
    idx[2, 6, 2:] = -1  # 2 blocks in one query block of sequence 2
    calls, gathers = [], []
    sdpa, gather_blocks = torch.nn.functional.scaled_dot_product_attention, SparseLayout.gather_blocks
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    )
    monkeypatch.setattr(SparseLayout, "gather_blocks", lambda *a: gathers.append(len(a[2])) or gather_blocks(*a))
    q, latents, bias = float64_inputs(3, 3, 128, 10, idx.shape)
    assert_equals_reference("torch", q, latents, idx, layout)
    assert len(calls) == 1 + 3  # the prefix (query blocks 0-2), then widths 2, 3 and 4
    assert gathers == [3]  # one gather for the three widths
    assert_equals_reference("torch", q, latents, idx, layout, bias)


def test_a_zero_bias_in_the_values_shares_the_calls_of_unbiased_rows(monkeypatch):
    """The rank mask (a bias of value 0) takes its gradient from taps where the block indicators fit: the rows
    whose bias carries a gradient share the calls of the other rows of their width, and the output is bit
    for bit that of no bias."""
    idx, layout = random_selection(3, 128, 4, 8, 16)  # 2 diagonal blocks + at most 4 slots: 6 of 8 free columns
    idx[1, 5:, 3] = -1
    q, latents = torch.randn(3, 2, 128, 16), torch.randn(3, 128, 16)
    bias = torch.zeros(idx.shape, requires_grad=True)
    flagged = torch.zeros(layout.n_rows, dtype=torch.bool)
    flagged[[4, 6]] = True  # after the whole-past prefix (query blocks 0-2)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw)
    )
    plain, _ = torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=8)
    plain_calls = len(calls)
    biased, _ = torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=8, slot_bias=bias, biased_rows=flagged)
    assert plain_calls == 1 + 2 and len(calls) == 2 * plain_calls  # the prefix, then widths 3 and 4
    assert torch.equal(plain, biased)  # gradients: test_rank_mask_gradient_equals_reference


@pytest.mark.parametrize("max_call", [1, 5000])
def test_block_backend_split_into_several_sdpa_calls_equals_reference(max_call):
    idx, layout = random_selection(2, 100, 3, 4, 8)
    q, latents, _ = float64_inputs(2, 3, 100, 10)
    assert_equals_reference(torch_block_attention, q, latents, idx, layout, max_call=max_call)


@pytest.mark.parametrize("D", [8, 16])  # the rank mask in an extra column; in value factors
@pytest.mark.parametrize("per_row", [False, True])  # one mask for all rows; a mask per row
def test_calls_with_fewer_rows_than_threads_copy_the_key_head_and_equal_reference(monkeypatch, D, per_row):
    """With more threads than rows in a call, the shared key head is copied (a divisor of the heads, here all
    3): outputs and gradients, the rank mask's too, stay the reference's."""
    idx, layout = random_selection(1, 96, 4, 8, 16, per_row=per_row)  # one sequence: calls of 1-3 rows
    q, latents, _ = float64_inputs(1, 3, 96, D)
    bias = torch.zeros(idx.shape, dtype=torch.float64, requires_grad=True)
    copies = []
    key_heads = sdpa_block.key_heads
    monkeypatch.setattr(sdpa_block, "key_heads", lambda *a: copies.append(key_heads(*a)) or copies[-1])
    with cpu_threads(8):
        assert_equals_reference(torch_block_attention, q, latents, idx, layout)
        ref = attention_and_grads("reference", q, latents, idx, layout, bias)
        got = attention_and_grads(torch_block_attention, q, latents, idx, layout, bias)
    assert_backends_agree(ref, got)
    assert ref["dbias"].abs().max() > 0.01
    assert copies and set(copies) == {3}


@pytest.mark.parametrize("shared", [True, False])
def test_a_rows_output_is_the_same_bits_in_a_call_of_any_size(shared):
    """A call's size decides the key head copies (`key_heads`), and other rows' budgets decide a call's size:
    a row's output must not change in a single bit with it (float32, 2 and 4 threads)."""
    layout = SparseLayout(1024, 64, 128)
    q, latents = torch.randn(3, 128, 4, 48), torch.randn(1, 1024, 48)
    indices = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 6], [0, 1, 2, 8]])
    if not shared:
        indices[:, -1] = -1
    rows, seqs = torch.tensor([5, 6, 7]), torch.zeros(3, dtype=torch.long)
    for n_threads in (2, 4):
        with cpu_threads(n_threads):
            outs = []
            for n in (1, 2, 3):
                keys, mask = layout.gather_key_blocks(latents, indices[:n], seqs[:n], rows[:n])
                mask = None if shared else mask
                out, _ = sdpa_block.gathered_attention(q[:n], keys, mask, rows[:n], None, layout, 0.1, 32, False)
                outs.append(out[0])
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("L,k", [(40, 12), (130, 50)])
def test_biased_token_attention_equals_reference(L, k):
    idx, layout = random_selection(3, L, k, per_row=True)
    idx[1, :, 3:] = -1  # sequence 1 uses fewer slots: processed on its own
    q, latents, bias = float64_inputs(3, 2, L, 8, idx.shape)
    assert_equals_reference("torch", q, latents, idx, layout, bias)


def test_biased_block_attention_equals_reference():
    idx, layout = random_selection(3, 96, 4, 8, 16)
    idx[2, :, 1:] = -1  # a sequence with a smaller k
    q, latents, bias = float64_inputs(3, 2, 96, 8, idx.shape)
    assert_equals_reference("torch", q, latents, idx, layout, bias)


@pytest.mark.parametrize("zero", [True, False])  # the rank mask (value 0); any bias
def test_biased_rows_among_the_whole_past_keep_the_prefix_call_and_equal_reference(monkeypatch, zero):
    """Query blocks 0-2 select their whole past (k = 4 blocks); flagging blocks 1 and 2 keeps them in the
    prefix's one causal call (each bias in a key column of its own) with the reference's outputs and gradients."""
    idx, layout = random_selection(2, 128, 4, 8, 16)
    q, latents, bias = float64_inputs(2, 3, 128, 10, idx.shape)
    if zero:
        bias = torch.zeros(idx.shape, dtype=torch.float64, requires_grad=True)
    flagged = torch.tensor([False, True, True, False, False, True, False, False])
    prefix_rows = []
    prefix = torch_block.prefix_attention

    def counted(q, lat, idx, *args):
        prefix_rows.append(idx.shape[1])
        return prefix(q, lat, idx, *args)

    monkeypatch.setattr(torch_block, "prefix_attention", counted)
    weight = flagged.double()[None, :, None]
    ref = attention_and_grads("reference", q, latents, idx, layout, bias, weight=weight)
    got = attention_and_grads(torch_block_attention, q, latents, idx, layout, bias, weight=weight, biased_rows=flagged)
    assert_backends_agree(ref, got)
    assert prefix_rows == [3] and ref["dbias"][:, 1:3].abs().max() > 0.01


def test_full_selection_equals_dense_causal_attention():
    idx, layout = random_selection(2, 50, 50)
    q, latents, _ = float64_inputs(2, 3, 50, 8)
    out, _ = sparse_attention(q, latents, idx, layout, scale=0.5, v_dim=8, backend="torch")
    kv = latents[:, None]
    dense = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, scale=0.5)
    assert (out - dense).abs().max() < 1e-10


def test_auto_backend_picks_the_fused_kernels_of_each_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, 64, 128) == "cpu"
    assert resolve_backend("auto", cpu, 1) == "torch"
    assert resolve_backend("auto", cuda, 64, 128) == "flex"
    assert resolve_backend("auto", cuda, 8, 8) == "torch"  # smaller than FlexAttention's tile
    assert resolve_backend("auto", cuda, 1) == ("triton" if triton_available() else "torch")
    with pytest.raises(
        ValueError, match="model.sparse.backend=flex does not fit model.sparse.block_size=8, query_block=16"
    ):
        resolve_backend("flex", cuda, 8, 16)
    with pytest.raises(ValueError, match="triton is token-level"):
        resolve_backend("triton", cpu, 64)
    with pytest.raises(ValueError, match="flex and cpu are block-level"):
        resolve_backend("cpu", cpu, 1)


@pytest.mark.parametrize("block,qblock", [(1, 1), (8, 8)])
def test_float32_rank_bias_drives_bfloat16_attention(block, qblock):
    idx, layout = random_selection(2, 40, 10 if block == 1 else 2, block, qblock, per_row=block == 1)
    q = torch.randn(2, 3, 40, 8, dtype=torch.bfloat16, requires_grad=True)
    latents = torch.randn(2, 40, 8, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(idx.shape, requires_grad=True)  # the controller's soft rank mask stays float32
    out, _ = sparse_attention(q, latents, idx, layout, scale=0.3, v_dim=8, backend="torch", slot_bias=bias)
    out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32 and bias.grad.abs().sum() > 0


def test_flex_falls_back_to_torch_for_a_slot_bias_with_one_warning():
    from adaptive_attn.ops.dispatch import _flex_unless_biased

    calls = []
    attend = _flex_unless_biased(lambda *a, **kw: calls.append("flex"))
    idx, layout = random_selection(1, 32, 1, 16, 16)
    q, latents, bias = float64_inputs(1, 2, 32, 8, idx.shape)
    attend(q, latents, idx, layout, scale=0.3, v_dim=8)
    with pytest.warns(UserWarning, match="torch backend"):
        out, _ = attend(q, latents, idx, layout, scale=0.3, v_dim=8, slot_bias=bias)
    ref, _ = sparse_attention(q, latents, idx, layout, scale=0.3, v_dim=8, backend="reference", slot_bias=bias)
    assert calls == ["flex"] and (out - ref).abs().max() < 1e-9


def test_block_backend_skips_the_bias_column_only_where_the_bias_is_zero():
    """biased_rows marks the query blocks whose bias carries a gradient: the others, zero in value and
    gradient, attend without the bias column (and may take the causal prefix call); the result is the
    reference's for the same bias."""
    idx, layout = random_selection(3, 96, 4, 8, 16, per_row=True)
    q, latents, bias = float64_inputs(3, 2, 96, 8, idx.shape)
    biased_rows = torch.tensor([False, False, True, False, True, False])
    weight = biased_rows.double()[None, :, None]
    ref = attention_and_grads("reference", q, latents, idx, layout, bias, weight=weight)
    got = attention_and_grads(
        torch_block_attention, q, latents, idx, layout, bias, weight=weight, biased_rows=biased_rows
    )
    assert_backends_agree(ref, got)
    assert ref["dbias"][:, biased_rows].abs().sum() > 0 and not ref["dbias"][:, ~biased_rows].any()


@pytest.mark.parametrize(
    "L,block,qblock,kb,D,per_row,fits",
    [
        (96, 8, 16, 4, 16, False, "all"),  # 10 free columns: every call's blocks, the causal prefix's too
        (100, 4, 8, 4, 10, True, "some"),  # 4 free columns and the bias one: up to 3 slots (+2 diagonal) only
        (300, 2, 8, 3, 7, False, "none"),  # one free column and the bias one: not even 4 diagonal blocks
        (300, 2, 8, 5, 7, False, "prefix"),  # the same, but query block 1 selects its whole past: a prefix call
    ],
)
def test_block_backend_returns_each_selected_blocks_attention_mass(L, block, qblock, kb, D, per_row, fits):
    """The value columns past v_dim carry block indicators where they fit: the op's mass per selected
    block equals a separate computation of it (`losses.block_mass`), with a rank-mask-like bias (zero in
    value) in place; rows without room are NaN, and with no such row the op returns None."""
    idx, layout = random_selection(2, L, kb, block, qblock, per_row=per_row)
    q, latents, raw_bias = float64_inputs(2, 3, L, D, idx.shape)
    bias = raw_bias - raw_bias.detach()
    out, mass = torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=6, slot_bias=bias)
    ref, _ = sparse_attention(q, latents, idx, layout, scale=0.3, v_dim=6, backend="reference")
    assert (out - ref).abs().max() < 1e-10
    if fits == "none":
        assert mass is None
        return
    padded_q, padded_latents = layout.pad(q.detach(), 2), layout.pad(latents.detach(), 1)
    expected = losses.block_mass(padded_q, padded_latents, idx, layout, 0, layout.n_rows, 0.3) * (idx >= 0)
    known = ~mass[..., 0].isnan()
    selecting = idx[..., 0] >= 0
    assert bool(known[selecting].all()) == (fits == "all") and known[selecting].any()
    if fits == "prefix":  # whose bias columns (one per query block, 8 in all) leave room for the indicators
        assert bool(known[:, :2].all()) and not known[:, 2:].any()
    assert (mass[known] - expected[known]).abs().max() < 1e-10


def test_a_rows_output_depends_on_no_other_rows_budget():
    """Bit for bit: another row's budget changes the calls it shares (here one of its 20 slots goes unused,
    so its call needs a mask per query block), and every other row's output stays the same (float32)."""
    idx, layout = random_selection(2, 256, 20, 4, 8)
    q, latents = torch.randn(2, 3, 256, 10), torch.randn(2, 256, 10)
    out, _ = torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=6)
    idx[1, 20, 19] = -1
    changed, _ = torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=6)
    rows = torch.arange(256) // 8
    assert not torch.equal(out[1, :, rows == 20], changed[1, :, rows == 20])
    assert torch.equal(out[0], changed[0]) and torch.equal(out[1, :, rows != 20], changed[1, :, rows != 20])


@pytest.mark.parametrize("D", [8, 16])  # 2 free value columns: the bias column; 10: through taps
@pytest.mark.parametrize("some_rows", [False, True])
@pytest.mark.parametrize("fused", [False, True])  # SDPA; the `cpu` backend's kernel (block sums of dlogits)
def test_rank_mask_gradient_equals_reference(D, some_rows, fused):
    """A bias of value 0 (the adaptive budget's rank mask) has the reference's gradient whether it rides in
    an extra column or, where the block indicators fit, through taps on the values and the output, and in the
    C++ kernel."""
    idx, layout = random_selection(3, 96, 4, 8, 16, per_row=True)
    q, latents, _ = float64_inputs(3, 2, 96, D)
    bias = torch.zeros(idx.shape, dtype=torch.float64, requires_grad=True)
    biased_rows = torch.tensor([False, True, True, False, True, False]) if some_rows else None
    weight = None if biased_rows is None else biased_rows.double()[None, :, None]
    ref = attention_and_grads("reference", q, latents, idx, layout, bias, weight=weight)
    got = attention_and_grads(
        torch_block_attention, q, latents, idx, layout, bias, weight=weight, biased_rows=biased_rows, fused=fused
    )
    assert_backends_agree(ref, got)
    assert ref["dbias"].abs().max() > 0.01


def test_masks_and_indicators_first_built_in_evaluation_serve_training():
    """The op builds its shared masks and block indicators once per shape (`shared_mask`, `block_indicator`);
    ones first built under inference mode (validation) must still take part in a training backward."""
    sdpa_block._shared_mask.cache_clear()
    sdpa_block._block_indicator.cache_clear()
    idx, layout = random_selection(2, 128, 4, 8, 16)
    q, latents, _ = float64_inputs(2, 3, 128, 16)  # 8 value columns, 8 free for the indicators
    with torch.inference_mode():
        torch_block_attention(q, latents, idx, layout, scale=0.3, v_dim=8)
    assert sdpa_block._shared_mask.cache_info().currsize and sdpa_block._block_indicator.cache_info().currsize
    assert_equals_reference(torch_block_attention, q, latents, idx, layout)
