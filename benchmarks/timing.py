"""Timing shared by the benchmarks: the callables under comparison take turns, round by round, so that
drifts of the machine's speed (large on small shared CPUs) reach all of them alike."""

import time

import torch
from tqdm.auto import tqdm


def take_turns(fns, repeats: int, warmup: int = 1, desc: str | None = None) -> list[list]:
    """Call every fn once per round, `warmup + repeats` rounds -> per fn, its results of the timed rounds."""
    results: list[list] = [[] for _ in fns]
    for i in tqdm(range(warmup + repeats), desc=desc, disable=desc is None):
        for fn, out in zip(fns, results):
            value = fn()
            if i >= warmup:
                out.append(value)
    return results


def wall_ms(fn, device: torch.device):
    """-> a callable that runs fn() and returns its wall time in ms (synchronising CUDA around it)."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - start)

    return timed


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
