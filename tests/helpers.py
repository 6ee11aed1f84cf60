"""Helpers shared by the tests: tiny models, random selections, backend comparisons, causality."""

import contextlib

import torch

from adaptive_attn.ops.dispatch import sparse_attention
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.sparse.selector import TopKTokenSelector


def tiny_model_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        rope_dim=4,
        kv_rank=16,
        moe=dict(n_routed=4, n_shared=1, top_k=2, d_ff_expert=32),
    )
    kwargs.update(overrides)
    return kwargs


def random_selection(B, L, k, block_size=1, query_block=None, per_row=False, generator=None):
    """Top-k of random scores -> (indices [B, R, K], layout). k in columns (tokens, or past key blocks);
    `per_row` draws each row's k in [1, k]."""
    layout = SparseLayout(L, block_size, query_block)
    scores = torch.randn(B, layout.n_rows, layout.n_columns, generator=generator)
    if per_row:
        k = torch.randint(1, k + 1, (B, layout.n_rows), generator=generator)
    return TopKTokenSelector()(scores, k, layout), layout


# (L, block_size, query_block, k in key blocks): padding, several key blocks per query block, k past every
# row's eligible blocks, and k = 0
BLOCK_CASES = [(64, 8, 8, 3), (100, 8, 16, 2), (33, 4, 12, 100), (256, 16, 32, 4), (300, 4, 8, 5), (70, 8, 16, 0)]


def float64_inputs(B, H, L, D, bias_shape=None):
    """Random float64 leaves: q [B, H, L, D], latents [B, L, D] and a slot bias of `bias_shape` (or None)."""
    q = torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True)
    latents = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(bias_shape, dtype=torch.float64, requires_grad=True) if bias_shape else None
    return q, latents, bias


def grads(fn, *tensors) -> list[torch.Tensor]:
    """-> [fn(*tensors), d(weighted sum of it)/d each tensor], with fixed random weights."""
    out = fn(*tensors)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
    return [out, *torch.autograd.grad((out * weight).sum(), tensors)]


def attention_and_grads(
    backend, q, latents, indices, layout, slot_bias=None, v_dim=6, scale=0.3, weight=None, **kwargs
):
    """-> {"out", "slot_probs", "dq", "dlatents", "dbias"} of one backend (or backend function). `weight`
    multiplies the slot bias inside the computation (zero rows: a bias without value or gradient)."""
    inputs = [q, latents] + ([slot_bias] if slot_bias is not None else [])
    fn = backend if callable(backend) else None
    name = None if fn else backend

    def attend(q, latents, bias=None):
        bias = bias if bias is None or weight is None else bias * weight
        if fn is not None:
            return fn(q, latents, indices, layout, scale=scale, v_dim=v_dim, slot_bias=bias, **kwargs)
        return sparse_attention(q, latents, indices, layout, scale=scale, v_dim=v_dim, backend=name, slot_bias=bias)

    out, slot_probs = attend(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype).to(out.device)
    differentials = torch.autograd.grad((out * weight).sum(), inputs)
    return dict(zip(["out", "slot_probs", "dq", "dlatents", "dbias"], [out, slot_probs, *differentials]))


def assert_backends_agree(reference: dict, other: dict, tol: float = 1e-9) -> None:
    """Outputs, slot probabilities (where both return them) and gradients agree to `tol`, relative to the
    largest reference value."""
    for name, ref in reference.items():
        got = other.get(name)
        if ref is None or got is None:
            continue
        ref, got = ref.detach().double(), got.detach().double()
        error = float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert error < tol, f"{name}: relative error {error:.2e}"


def assert_causal(model, seq_len, vocab=50, batch=2, cuts=None, device="cpu") -> None:
    """Changing tokens after position t must leave logits at <= t bit-identical (and change later ones),
    in training and evaluation mode. Both passes see the same random state (training forward passes may
    draw rows, e.g. for the rank mask's gradient)."""
    tokens = torch.randint(0, vocab, (batch, seq_len), device=device)

    def forward(inputs):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return model(inputs)[0]

    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            base = forward(tokens)
            for t in cuts or (0, seq_len // 3, seq_len // 2, seq_len - 2):
                changed = tokens.clone()
                changed[:, t + 1 :] = torch.randint(0, vocab, (batch, seq_len - t - 1), device=device)
                out = forward(changed)
                assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} saw the future (train={mode})"
                assert not torch.equal(out[:, t + 1 :], base[:, t + 1 :])


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's CPU threads set to n inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
