"""Multi-query associative recall (MQAR), generated as Zoology does (HazyResearch/zoology,
`zoology/data/multiquery_ar.py`), with a per-sequence difficulty.

A sequence lists `n` key-value pairs (`k1 v1 ... kn vn`) after its task token, then asks for every key
once: each query key sits at a gap after the context drawn from a power law (p(gap) ~ gap^(a - 1),
a = 0.01 by default: most queries close to the context, some far), and its target is its value.
Every other position holds a random content token (also the one after a query: the value is never
shown there). Each sequence draws its own `n`
(log-uniform in [min_pairs, max_pairs]): its difficulty. The vocabulary should be larger than the
sequence (Zoology: 8192), so keys rarely repeat among the fillers.

A query needs one earlier position: its key's value in the context (where an induction head finds the
key, as the token before it).
"""

import numpy as np

from adaptive_attn.data.synthetic import RECALL_BOS, content_range, log_uniform


def resolve_pairs(seq_len: int, min_pairs: int | None, max_pairs: int | None) -> tuple[int, int]:
    """The pair range of a sequence length: defaults (max: seq_len // 4; min: an eighth of max) and the
    rule 1 <= min_pairs <= max_pairs <= seq_len // 4 (the queries need as many slots after the context);
    ValueError naming the key."""
    hi = seq_len // 4
    if hi < 1:
        raise ValueError(f"seq_len={seq_len} is invalid for MQAR: must be >= 4")
    max_pairs = hi if max_pairs is None else max_pairs
    if not (isinstance(max_pairs, int) and 1 <= max_pairs <= hi):
        raise ValueError(f"data.max_pairs={max_pairs!r} is invalid: must be an integer in [1, seq_len // 4 = {hi}]")
    min_pairs = max(1, max_pairs // 8) if min_pairs is None else min_pairs
    if not (isinstance(min_pairs, int) and 1 <= min_pairs <= max_pairs):
        raise ValueError(
            f"data.min_pairs={min_pairs!r} is invalid: must be an integer in [1, data.max_pairs={max_pairs}]"
        )
    return min_pairs, max_pairs


def mqar_sample(rng: np.random.Generator, seq_len: int, vocab_size: int, n_pairs: int, power_a: float = 0.01) -> dict:
    """One MQAR sequence with `n_pairs` key-value pairs (see the module doc) -> the synthetic sample format."""
    lo, hi = content_range(vocab_size)
    half = (lo + hi) // 2
    keys = rng.choice(np.arange(lo, half), size=n_pairs, replace=False)
    values = rng.choice(np.arange(half, hi), size=n_pairs, replace=False)
    tokens = rng.integers(lo, hi, size=seq_len + 1)
    tokens[0] = RECALL_BOS
    tokens[1 : 1 + 2 * n_pairs : 2], tokens[2 : 2 + 2 * n_pairs : 2] = keys, values
    start = 1 + 2 * n_pairs  # the first position after the context
    slots = (seq_len - start + 1) // 2  # (query, value) slots that fit before the end
    p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    gaps = rng.choice(slots, size=n_pairs, replace=False, p=p / p.sum())
    queries = start + 2 * gaps
    tokens[queries] = keys
    targets = tokens[1:].copy()
    targets[queries] = values
    target_mask = np.zeros(seq_len, dtype=bool)
    target_mask[queries] = True
    need_id = np.zeros(seq_len, dtype=np.int64)
    need_id[queries] = need_id[2 + 2 * np.arange(n_pairs)] = np.arange(1, n_pairs + 1)
    return {"tokens": tokens, "targets": targets, "target_mask": target_mask, "need_id": need_id}


def make_mqar(seq_len: int, vocab_size: int, min_pairs: int, max_pairs: int, power_a: float = 0.01):
    """-> rng -> a sample with a log-uniform number of pairs (its difficulty)."""

    def sample(rng: np.random.Generator) -> dict:
        n = log_uniform(rng, min_pairs, max_pairs)
        return {**mqar_sample(rng, seq_len, vocab_size, n, power_a), "task": 0, "difficulty": n}

    return sample
