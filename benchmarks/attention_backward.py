"""Could a CPU backward built from BLAS products beat SDPA's fused one on the sparse op's block call? The call
is fixed25's at research L=4096 (24 query blocks, each its 128 queries x 4 heads as one head of 512 rows over
14 selected key blocks of 64 and its 2 diagonal ones, the shared causal mask on those). Its forward is SDPA's
flash kernel, which keeps each row's log-sum-exp; then, timed in turns in one process:
- SDPA's own backward (the baseline);
- a BLAS backward: for each tile of query rows, the probabilities recomputed from the log-sum-exp, then five
  products, two of them over only the v_dim value columns (SDPA multiplies over the 48-wide latent rows for
  all five), rows split over the CPU's threads, each thread's products single-threaded;
- the same, one row at a time with every product on all threads;
- the five products alone, rows split, without the elementwise work between them: what no backward built
  from these BLAS calls can beat.

    GOMP_SPINCOUNT=0 python benchmarks/attention_backward.py --json results/attention_backward.json
"""

import argparse
import json
import threading

import torch
import torch.nn.functional as F
from attention_forms import block_call_arguments
from timing import median, take_turns, timed_call

from adaptive_attn.ops.layout import SparseLayout
from adaptive_attn.ops.sdpa_block import shared_mask
from adaptive_attn.process import apply_training_settings, device_name

CPU = torch.device("cpu")
SDPA, PRODUCTS = "SDPA's fused backward", "its products alone, rows over threads"


def row_backward(q, keys, grad_out, lse, delta, mask, scale: float, tile: int, exact: bool = True):
    """One row: q [M, W], keys [S, W] (its values are their first v_dim columns), grad_out [M, v_dim], lse and
    delta [M, 1], mask [M, S] -> (dq [M, W], dk [S, W], the values' gradient added in). Without `exact`, the
    products alone (the probabilities and score gradients left as the products made them)."""
    v_dim = grad_out.shape[-1]
    dq, dk = torch.empty_like(q), torch.zeros_like(keys)
    for start in range(0, q.shape[0], tile):
        rows = slice(start, start + tile)
        p = torch.addmm(mask[rows], q[rows], keys.T, alpha=scale)
        if exact:
            p.sub_(lse[rows]).exp_()
        dk[:, :v_dim].addmm_(p.T, grad_out[rows])
        ds = torch.mm(grad_out[rows], keys[:, :v_dim].T)
        if exact:
            ds.sub_(delta[rows]).mul_(p)
        torch.mm(ds, keys, out=dq[rows]).mul_(scale)
        dk.addmm_(ds.T, q[rows], alpha=scale)
    return dq, dk


def blas_backward(q, keys, out, grad_out, lse, mask, scale: float, tile: int, split: bool, exact: bool = True):
    """q [n, M, W], keys [n, S, W], out and grad_out [n, M, v_dim], lse [n, M], mask [M, S] -> (dq, dk), each
    row on one thread (`split`, its products single-threaded) or all threads on each row in turn."""
    delta = (grad_out * out).sum(-1, keepdim=True)
    dq, dk = torch.empty_like(q), torch.empty_like(keys)

    def run(rows, threads: int) -> None:
        torch.set_num_threads(threads)
        for i in rows:
            dq[i], dk[i] = row_backward(q[i], keys[i], grad_out[i], lse[i, :, None], delta[i], mask, scale, tile, exact)

    threads = torch.get_num_threads()
    if not split or threads == 1:
        run(range(len(q)), threads)
        return dq, dk
    workers = [threading.Thread(target=run, args=(range(w, len(q), threads), 1)) for w in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    torch.set_num_threads(threads)
    return dq, dk


def block_call(args) -> dict:
    """fixed25's block call: leaves q [n, 1, Q * H, W] and keys [n, 1, S, W], the shared mask, the gradient of
    the output (0 past v_dim: the op reads only the values' columns)."""
    layout = SparseLayout(args.seq_len, args.block_size, args.query_block)
    n, H, width = args.rows, args.heads, args.kv_rank + args.rope_dim
    S = (args.selected + layout.blocks_per_query_block) * args.block_size
    dtype = getattr(torch, args.dtype)
    q = torch.randn(n, 1, args.query_block * H, width, dtype=dtype, requires_grad=True)
    keys = torch.randn(n, 1, S, width, dtype=dtype, requires_grad=True)
    grad_out = F.pad(torch.randn(n, 1, args.query_block * H, args.kv_rank, dtype=dtype), (0, args.rope_dim))
    mask = shared_mask(layout, args.selected, H, q)
    return {"q": q, "keys": keys, "grad_out": grad_out, "mask": mask, "scale": width**-0.5}


def backward_forms(call: dict, args, grads: dict) -> dict:
    """{form: a callable that runs the call's forward, then its backward in that form -> backward ms; the
    gradients (dq, dk) of its latest run in grads[form]}"""
    q, keys, grad_out, mask, scale = call["q"], call["keys"], call["grad_out"], call["mask"], call["scale"]
    n, v_dim = q.shape[0], args.kv_rank

    def sdpa():
        q.grad = keys.grad = None
        out = F.scaled_dot_product_attention(q, keys, keys, attn_mask=mask, scale=scale)
        ms, _ = timed_call(lambda: out.backward(grad_out), CPU)
        grads[SDPA] = q.grad.view(n, -1, q.shape[-1]), keys.grad.view(n, -1, keys.shape[-1])
        return ms

    def blas(name: str, split: bool, exact: bool = True):
        def run():
            with torch.no_grad():
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, keys, keys, attn_mask=mask, scale=scale
                )[:2]
            flat = [t.detach().view(n, t.shape[-2], -1) for t in (q, keys, out[..., :v_dim], grad_out[..., :v_dim])]
            inputs = (*flat, lse.view(n, -1), mask.view(mask.shape[-2:]), scale, args.tile, split, exact)
            ms, grads[name] = timed_call(lambda: blas_backward(*inputs), CPU)
            return ms

        return name, run

    return dict(
        [
            (SDPA, sdpa),
            blas("BLAS backward, rows over threads", split=True),
            blas("BLAS backward, each row on all threads", split=False),
            blas(PRODUCTS, split=True, exact=False),
        ]
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    block_call_arguments(p)
    p.add_argument("--tile", type=int, default=256, help="query rows per tile of the BLAS backward")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    return p.parse_args()


def main() -> None:
    args = parse_args()
    apply_training_settings()
    grads: dict = {}
    forms = backward_forms(block_call(args), args, grads)
    runs = take_turns(list(forms.values()), args.repeats, desc="rounds")
    base = median(runs[0])
    device = device_name(CPU)
    print(f"{device} {args.dtype}; fixed25's block call at L={args.seq_len}, backward")
    print(f"{'form':40s} {'ms':>8s} {'vs SDPA':>8s} {'max |grad - SDPA grad|':>23s}")
    records = []
    for name, times in zip(forms, runs):
        ms = median(times)
        error = None if name == PRODUCTS else max(float((a - b).abs().max()) for a, b in zip(grads[name], grads[SDPA]))
        records.append({"form": name, "ms": round(ms, 3), "vs_sdpa": round(ms / base, 3), "max_grad_error": error})
        records[-1].update(round_ms=[round(t, 3) for t in times], device=device, threads=torch.get_num_threads())
        records[-1].update({k: v for k, v in vars(args).items() if k != "json"})
        print(f"{name:40s} {ms:8.1f} {ms / base:8.3f} {'(not a gradient)' if error is None else f'{error:.2e}':>23s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
