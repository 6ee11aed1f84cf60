"""Op-level benchmark: a full DSA layer (indexer + top-k selection + sparse attention) vs dense causal SDPA.

Both sides are timed in the same process on the same device; the table reports ratios
(sparse / dense, < 1 is faster). Sparse attention runs in MLA's MQA mode: all H heads share the
selected latent rows (dim d_h here, to match the dense per-head dim).

`attn` times the sparse attention op alone over the same selection (what a fused kernel replaces);
`pairs` is the share of the causal (query, key) pairs the sparse layer attends.
Under DSA's budget (one k for every query; queries with fewer than k predecessors see all of them) it
is well above keep at keep 0.25, and it is the ratio a sparse layer would reach if it spent the same
time per attended pair as dense attention and no time on anything else.

    GOMP_SPINCOUNT=0 python benchmarks/attention.py --lengths 1024 2048 --keeps 0.25 0.5 --ks 64 \
        --modes token block --json results/attention_cpu.json
"""

import argparse
import json

import torch
import torch.nn.functional as F
from timing import median, take_turns, wall_ms
from tqdm.auto import tqdm

from adaptive_attn.ops.dispatch import sparse_attention
from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.process import apply_training_settings, device_name
from adaptive_attn.sparse.budget import FixedBudget, fixed_k
from adaptive_attn.sparse.dsa import DeepSeekSparseAttention
from adaptive_attn.sparse.indexer import LightningIndexer


def sparse_layer(d_model, block_size, query_block, backend, indexer_heads, indexer_dim) -> DeepSeekSparseAttention:
    indexer = LightningIndexer(d_model, n_heads=indexer_heads, head_dim=indexer_dim, rope_dim=min(16, indexer_dim))
    budget = FixedBudget(1.0)  # unused: the benchmark passes k itself
    return DeepSeekSparseAttention(indexer, budget, block_size=block_size, query_block=query_block, backend=backend)


def budget_columns(layout: SparseLayout, kind: str, value: float):
    """A benchmark budget in the layout's columns: a fixed keep, or k tokens."""
    return fixed_k(value, layout) if kind == "keep" else layout.columns_for_tokens(int(value))


def attended_share(layout: SparseLayout, indices: torch.Tensor) -> float:
    """The share of causal (query, key) pairs a selection attends."""
    return float(layout.attended_pairs((indices >= 0).sum(-1)).mean()) / layout.causal_pairs


def run_attention(dsa: DeepSeekSparseAttention, q, kv, indices, layout: SparseLayout) -> torch.Tensor:
    """The sparse attention op alone, over a given selection."""
    backend = dsa.attention(q.device)
    out, _ = sparse_attention(q, kv, indices, layout, scale=q.shape[-1] ** -0.5, v_dim=q.shape[-1], backend=backend)
    return out


def select(dsa: DeepSeekSparseAttention, x, layout: SparseLayout, k) -> torch.Tensor:
    """Indexer -> causal top-k (k in columns), as inside a DSA layer."""
    return dsa.selector(dsa.indexer(x, layout), layout.hard_columns(k), layout)


def run_sparse_layer(dsa: DeepSeekSparseAttention, x, q, kv, layout: SparseLayout, k) -> torch.Tensor:
    """Indexer -> causal top-k -> sparse attention, as inside a DSA layer (without the indexer's KL)."""
    return run_attention(dsa, q, kv, select(dsa, x, layout, k), layout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--keeps", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    p.add_argument("--ks", type=int, nargs="*", default=[64])
    p.add_argument("--modes", nargs="+", choices=["token", "block"], default=["token", "block"])
    p.add_argument("--passes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--indexer-heads", type=int, default=4)
    p.add_argument("--indexer-dim", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--query-block", type=int, default=64)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the records to this path")
    args = p.parse_args()
    process = apply_training_settings()  # as the training entry point does

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    B, H, D = args.batch, args.heads, args.head_dim
    blocks = {"token": (1, 1), "block": (args.block_size, args.query_block)}
    layers = {
        mode: sparse_layer(args.d_model, *blocks[mode], args.backend, args.indexer_heads, args.indexer_dim)
        for mode in args.modes
    }
    for layer in layers.values():
        layer.to(device, dtype)
    budgets = [("keep", keep) for keep in args.keeps] + [("k", k) for k in args.ks]
    jobs = [
        (L, mode, budget, ps) for L in args.lengths for ps in args.passes for mode in args.modes for budget in budgets
    ]
    print(
        f"device: {device_name(device)}  dtype: {args.dtype}  B={B} H={H} d_h={D}  "
        "(ratio = full sparse layer / dense causal SDPA, < 1 is faster; attn = the attention op alone over the "
        "same selection; pairs = share of causal pairs attended)"
    )
    header = f"{'ms':>9} {'attn ms':>9} {'dense ms':>9} {'ratio':>7} {'attn':>7} {'pairs':>7}"
    print(f"{'mode':6} {'pass':7} {'L':>6} {'budget':>11} {header}")
    records = []
    for L, mode, (kind, value), ps in tqdm(jobs, desc="benchmark"):
        record = {"mode": mode, "L": L, kind: value, "pass": ps, "device": device_name(device)}
        record.update(dtype=args.dtype, B=B, H=H, d_h=D, process=process)
        if mode == "block":
            record.update(block_size=args.block_size, query_block=args.query_block)
        try:
            layout = layers[mode].layout(L, device)
            columns = budget_columns(layout, kind, value)
            record["columns"] = layout.hard_columns(columns)  # tokens, or past blocks besides the diagonal
            record.update(measure(layers[mode], layout, columns, ps, B, H, D, args.d_model, args.repeats, dtype))
        except Exception as err:  # one configuration that fails (a kernel, memory) must not end the table
            record["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(record)

        # each row as it is measured, and the JSON so far: a run cut short keeps what it measured
        tqdm.write(table_row(record))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)


def measure(layer, layout, k, ps, B, H, D, d_model, repeats, dtype) -> dict:
    """Time the full sparse layer, its attention op alone and dense causal SDPA, in turns -> their fields.
    k: the budget in the layout's columns."""
    L, device = layout.seq_len, layout.device
    x = torch.randn(B, L, d_model, device=device, dtype=dtype)
    # MLA's absorbed queries are laid out [B, L, H, D] (see MultiHeadLatentAttention.absorb)
    q = torch.randn(B, L, H, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_(ps == "fwdbwd")
    kv = torch.randn(B, L, D, device=device, dtype=dtype, requires_grad=ps == "fwdbwd")

    # the output's gradient as an attention layer receives it: laid out [B, L, H, D], as its output
    # is transposed back to tokens before the output projection (for dense and sparse alike)
    grad = torch.randn(B, L, H, D, device=device, dtype=dtype).transpose(1, 2)

    def run(fn):
        if ps == "fwd":
            with torch.no_grad():
                fn()
        else:
            fn().backward(grad)

    qd = torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=ps == "fwdbwd")
    kd, vd = (torch.randn_like(qd).requires_grad_(ps == "fwdbwd") for _ in range(2))
    with torch.no_grad():
        indices = select(layer, x, layout, k)
    layer_runs, attention_runs, dense_runs = take_turns(
        [
            wall_ms(lambda: run(lambda: run_sparse_layer(layer, x, q, kv, layout, k)), device),
            wall_ms(lambda: run(lambda: run_attention(layer, q, kv, indices, layout)), device),
            wall_ms(lambda: run(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)), device),
        ],
        repeats,
    )
    ms, attention_ms, dense_ms = median(layer_runs), median(attention_runs), median(dense_runs)
    return {
        "ms": round(ms, 3),
        "attention_ms": round(attention_ms, 3),
        "dense_ms": round(dense_ms, 3),
        "ratio_vs_dense": round(ms / dense_ms, 3),
        "attention_ratio_vs_dense": round(attention_ms / dense_ms, 3),
        "pairs_vs_dense": round(attended_share(layout, indices), 3),
    }


def table_row(r: dict) -> str:
    budget = f"keep {r['keep']:.2f}" if "keep" in r else f"k {r['k']:g}"
    if "error" in r:
        return f"{r['mode']:6} {r['pass']:7} {r['L']:>6} {budget:>11}  error: {r['error']}"
    times = f"{r['ms']:>9.1f} {r['attention_ms']:>9.1f} {r['dense_ms']:>9.1f} {r['ratio_vs_dense']:>7.3f}"
    times += f" {r['attention_ratio_vs_dense']:>7.3f} {r['pairs_vs_dense']:>7.3f}"
    return f"{r['mode']:6} {r['pass']:7} {r['L']:>6} {budget:>11} {times}"


if __name__ == "__main__":
    main()
