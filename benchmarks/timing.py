"""Timing shared by the benchmarks: the callables under comparison take turns, round by round, so that
drifts of the machine's speed (large on small shared CPUs) reach all of them alike."""

import math
import time

import torch
from tqdm.auto import tqdm


def take_turns(fns, repeats: int, warmup: int = 1, desc: str | None = None) -> list[list]:
    """Call every fn once per round, `warmup + repeats` rounds -> per fn, its results of the timed rounds.

    Every other round runs in reverse order (A B C, C B A, ...): a call runs faster or slower after some
    calls than after others (caches, the allocator), and in a fixed order the same fn would always pay
    it. Two copies of one training step read 7.7% apart here in a fixed order, 2.2% and 4.4% in this one."""
    results: list[list] = [[] for _ in fns]
    turns = list(zip(fns, results))
    for i in tqdm(range(warmup + repeats), desc=desc, disable=desc is None):
        for fn, out in turns if i % 2 == 0 else reversed(turns):
            value = fn()
            if i >= warmup:
                out.append(value)
    return results


def timed_call(fn, device: torch.device) -> tuple[float, object]:
    """Run fn() -> (its wall time in ms, synchronising CUDA around it; what it returned)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start), value


def wall_ms(fn, device: torch.device):
    """-> a callable that runs fn() and returns its wall time in ms."""
    return lambda: timed_call(fn, device)[0]


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median that values were drawn from: the order statistics
    (x_(j), x_(n+1-j)) of the largest j whose coverage, 1 - 2 P(Binomial(n, 1/2) < j), is at least
    `confidence` (for 9 values x_(2) and x_(8), 96%); the whole range when no j reaches it (under 6 values)."""
    x, n = sorted(values), len(values)
    below = 0.0  # P(Binomial(n, 1/2) < j)
    j = 0
    while j + 1 <= n - j and 1 - 2 * (below + math.comb(n, j) / 2**n) >= confidence:
        below += math.comb(n, j) / 2**n
        j += 1
    j = max(j, 1)
    return x[j - 1], x[n - j]


def paired_ratios(values: list[float], baseline: list[float]) -> list[float]:
    """Round by round (take_turns' rounds), each value over the baseline's in the same round: a drift of the
    machine's speed between rounds reaches both."""
    return [v / b for v, b in zip(values, baseline, strict=True)]
