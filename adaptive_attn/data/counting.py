"""Histogram counting with a per-sequence alphabet (after Behrens et al., 2024, "Counting in small
transformers"), causal: each position is labelled with the number of earlier occurrences of its symbol.

A sequence is a task token (an attention sink to read counts against) followed by symbols drawn
uniformly from an alphabet of `m` symbols of its own; `m` is its difficulty. The label of position t
is min(#{s < t: x_s = x_t}, cap), one of the count tokens. A query needs every earlier occurrence of
its symbol, so the need varies per sequence (a small alphabet repeats each symbol often) and per
position (it grows along the sequence).
"""

import numpy as np

from adaptive_attn.data.synthetic import COUNT_BOS, COUNT_LABELS, content_range


def check_counting(alphabets: list[int], cap: int, vocab_size: int) -> None:
    """ValueError naming the key, for alphabets the vocabulary cannot hold or a cap the labels cannot."""
    lo, hi = content_range(vocab_size)
    if not alphabets or not all(isinstance(m, int) and 1 <= m <= hi - lo for m in alphabets):
        raise ValueError(f"data.alphabets={alphabets!r} is invalid: each must be an integer in [1, {hi - lo}]")
    if not (isinstance(cap, int) and 1 <= cap < COUNT_LABELS):
        raise ValueError(f"data.count_cap={cap!r} is invalid: must be an integer in [1, {COUNT_LABELS - 1}]")


def counting_sample(rng: np.random.Generator, seq_len: int, vocab_size: int, alphabet: int, cap: int = 15) -> dict:
    """One counting sequence over `alphabet` symbols -> the synthetic sample format."""
    lo, hi = content_range(vocab_size)
    symbols = rng.choice(np.arange(lo, hi), size=alphabet, replace=False)
    tokens = np.concatenate([[COUNT_BOS], rng.choice(symbols, size=seq_len)])
    inputs = tokens[:-1]
    earlier = np.zeros(seq_len, dtype=np.int64)
    seen: dict[int, int] = {}
    for t in range(1, seq_len):
        earlier[t] = seen.get(int(inputs[t]), 0)
        seen[int(inputs[t])] = earlier[t] + 1
    targets = hi + np.minimum(earlier, cap)
    target_mask = np.arange(seq_len) >= 1
    need_id = np.where(target_mask, inputs, 0)
    return {"tokens": tokens, "targets": targets, "target_mask": target_mask, "need_id": need_id}


def make_counting(seq_len: int, vocab_size: int, alphabets: list[int], cap: int = 15):
    """-> rng -> a sample whose alphabet size (its difficulty) is drawn uniformly from `alphabets`."""

    def sample(rng: np.random.Generator) -> dict:
        m = int(rng.choice(alphabets))
        return {**counting_sample(rng, seq_len, vocab_size, m, cap), "task": 1, "difficulty": m}

    return sample
