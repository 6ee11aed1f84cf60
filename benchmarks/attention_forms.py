"""What an attended (query, head, key) pair costs in each form of attention a training step runs, forward and
backward, timed in turns in one process: dense causal SDPA in the dense model's per-head form (the baseline)
and in MLA's MQA form (every head over the shared latent rows), and one call of the block-sparse op's kind
(rows of query blocks over their gathered key blocks, the shared mask on the diagonal blocks) in both forms,
each with its gather of key blocks. The per-head form twice more: with the latent rows gathered and then
up-projected per head (`expanded`), and with every row's per-head keys and values already in place (`no
gather`: what no gather could beat). Last, the MQA form's call in the `cpu` backend's C++ kernel
(`block_kernel`), which multiplies the values over their kv_rank columns only.

MQA mode multiplies over the latent width (kv_rank + rope_dim) for the scores and for the values; the
per-head form over head_dim + rope_dim and head_dim padded to it (as the dense model's fused call). The
defaults are the research model at L=4096 with fixed25's call: 24 query blocks of 128 beyond the whole-past
prefix, 14 selected key blocks of 64 each.

    GOMP_SPINCOUNT=0 python benchmarks/attention_forms.py --json results/attention_forms.json
"""

import argparse
import json

import torch
import torch.nn.functional as F
from timing import median, take_turns, wall_ms

from adaptive_attn.ops import block_kernel
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.sdpa_block import shared_mask
from adaptive_attn.process import apply_training_settings, device_name


def leaf(*shape) -> torch.Tensor:
    return torch.randn(*shape, requires_grad=True)


def fwd_bwd(run, *leaves):
    """-> a callable: the output of run(*leaves), summed, backward into the leaves."""
    return lambda: run(*leaves).sum().backward()


def dense_forms(args, qk: int, latent: int) -> dict:
    """Dense causal attention over the whole sequence -> {name: (fwd+bwd callable, attended pairs)}"""
    H, L = args.heads, args.seq_len
    pairs = H * L * (L + 1) // 2

    def mqa(q, kv):
        kv = kv.expand(-1, H, -1, -1)
        return F.scaled_dot_product_attention(q, kv, kv, is_causal=True)

    def per_head(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (leaf(1, H, L, qk) for _ in range(3))
    return {
        "dense causal, per-head form": (fwd_bwd(per_head, q, k, v), pairs),
        "dense causal, MQA form": (fwd_bwd(mqa, leaf(1, H, L, latent), leaf(1, 1, L, latent)), pairs),
    }


def block_forms(args, qk: int, latent: int) -> dict:
    """One call of the block op's kind over `rows` query blocks -> {name: (fwd+bwd callable, attended pairs)}"""
    H, L, n, w = args.heads, args.seq_len, args.rows, args.selected
    layout = SparseLayout(L, args.block_size, args.query_block)
    Q, bs, m = layout.query_block, layout.block_size, layout.blocks_per_query_block
    S = (w + m) * bs
    blocks = torch.stack([torch.randperm(layout.n_columns)[: w + m] for _ in range(n)]).flatten()
    pairs = n * H * (Q * w * bs + Q * (Q + 1) // 2)  # the selected blocks, then the causal diagonal

    def mqa(q, latents):  # latents [blocks, bs * latent]; a row's Q queries of H heads as one head
        keys = latents.index_select(0, blocks).view(n, 1, S, latent)
        mask = shared_mask(layout, w, H, q)
        return F.scaled_dot_product_attention(q, keys, keys, attn_mask=mask)

    def mqa_kernel(q, latents):  # the `cpu` backend's kernel on the same rows, values over their kv_rank columns
        keys = latents.index_select(0, blocks).view(n, S, latent)
        return block_kernel.block_attention(q, keys, None, None, w, bs, latent**-0.5, args.kv_rank)[0]

    def per_head(q, kv):  # kv [H, blocks, bs * 2 qk], head-major: one gather serves every head
        g = kv.index_select(1, blocks).view(H, n, S, 2 * qk).transpose(0, 1)
        mask = shared_mask(layout, w, 1, q)
        return F.scaled_dot_product_attention(q, g[..., :qk], g[..., qk:], attn_mask=mask)

    def per_head_expanded(q, latents, w_uk, w_uv):  # the latent rows gathered, then up-projected per head
        c, k_rope = latents.index_select(0, blocks).view(n, S, latent).split([args.kv_rank, args.rope_dim], -1)
        k = torch.cat([torch.einsum("nsc,hdc->nhsd", c, w_uk), k_rope[:, None].expand(-1, H, -1, -1)], -1)
        v = F.pad(torch.einsum("nsc,hdc->nhsd", c, w_uv), (0, qk - args.head_dim))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=shared_mask(layout, w, 1, q))

    def per_head_in_place(q, k, v):  # each row's per-head keys and values already in place: no gather at all
        return F.scaled_dot_product_attention(q, k, v, attn_mask=shared_mask(layout, w, 1, q))

    n_blocks = L // bs
    q_heads = leaf(n, H, Q, qk)
    up = [leaf(H, args.head_dim, args.kv_rank) for _ in range(2)]  # W_UK, W_UV
    forms = {
        "block call, per-head form": fwd_bwd(per_head, q_heads, leaf(H, n_blocks, bs * 2 * qk)),
        "block call, per-head, expanded": fwd_bwd(per_head_expanded, q_heads, leaf(n_blocks, bs * latent), *up),
        "block call, per-head, no gather": fwd_bwd(per_head_in_place, q_heads, leaf(n, H, S, qk), leaf(n, H, S, qk)),
        "block call, MQA form": fwd_bwd(mqa, leaf(n, 1, Q * H, latent), leaf(n_blocks, bs * latent)),
    }
    if block_kernel.takes(q_heads):
        forms["block call, MQA, cpu kernel"] = fwd_bwd(mqa_kernel, leaf(n, Q, H, latent), leaf(n_blocks, bs * latent))
    return {name: (fn, pairs) for name, fn in forms.items()}


def block_call_arguments(p: argparse.ArgumentParser) -> None:
    """The shape of the block call (by default fixed25's in the research model at L=4096), and the rounds."""
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rope-dim", type=int, default=16)
    p.add_argument("--kv-rank", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--query-block", type=int, default=128)
    p.add_argument("--rows", type=int, default=24, help="query blocks in the block call")
    p.add_argument("--selected", type=int, default=14, help="key blocks each query block selects")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--json", default=None)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    block_call_arguments(p)
    p.add_argument("--head-dim", type=int, default=16)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    apply_training_settings()
    qk, latent = args.head_dim + args.rope_dim, args.kv_rank + args.rope_dim
    forms = {**dense_forms(args, qk, latent), **block_forms(args, qk, latent)}
    runs = take_turns([wall_ms(fn, torch.device("cpu")) for fn, _ in forms.values()], args.repeats, desc="rounds")
    base_ns = None
    records = []
    device = device_name(torch.device("cpu"))
    print(
        f"{device} float32; L={args.seq_len}, "
        f"{args.heads} heads, qk {qk} (per head) / {latent} (latent); forward + backward"
    )
    print(f"{'form':32s} {'ms':>8s} {'ns / pair':>10s} {'per pair vs dense, per-head form':>33s}")
    for (name, (_, pairs)), times in zip(forms.items(), runs):
        ms = median(times)
        ns = ms * 1e6 / pairs
        base_ns = base_ns or ns
        records.append(
            {
                "form": name,
                "ms": round(ms, 3),
                "pairs": pairs,
                "ns_per_pair": round(ns, 4),
                "per_pair_vs_dense": round(ns / base_ns, 3),
                "round_ms": [round(t, 3) for t in times],
                "device": device,
                **{k: v for k, v in vars(args).items() if k != "json"},
            }
        )
        print(f"{name:32s} {ms:8.1f} {ns:10.2f} {ns / base_ns:33.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
