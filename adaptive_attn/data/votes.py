"""Vote share: each position is labelled with the share of 1-votes cast so far for its key, a task whose
need grows with the sequence.

A sequence is a task token followed by ballots: a ballot names one of the sequence's own `m` keys and
carries a vote, 0 or 1 (one token per (key, vote)); each key draws its own bias p ~ U(0, 1). The label of
position t is the share of 1-votes among the n ballots for its key up to and including t, in 16 steps:
round(15 * ones / n), one of the count labels. A query needs every earlier ballot for its key, about
t / m of them, with no cap (counting's labels stop at 15): a budget of keep * L leaves some queries too
few of them at every length when m < 1 / keep. A missing ballot need not change the label, but the
fewer a query sees, the noisier its estimate: accuracy falls gradually as a budget binds harder.
"""

import numpy as np

from adaptive_attn.data.synthetic import COUNT_LABELS, VOTES_BOS, content_range


def ballot_range(vocab_size: int) -> tuple[int, int]:
    """[lo, hi) of the ballot tokens: content after the votes task token."""
    lo, hi = content_range(vocab_size)
    return max(lo, VOTES_BOS + 1), hi


def check_votes(alphabets: list[int], vocab_size: int) -> None:
    """ValueError naming the key, for alphabets the vocabulary cannot hold (two ballot tokens per key)."""
    lo, hi = ballot_range(vocab_size)
    most = (hi - lo) // 2
    if not alphabets or not all(isinstance(m, int) and 1 <= m <= most for m in alphabets):
        raise ValueError(f"data.alphabets={alphabets!r} is invalid: each must be an integer in [1, {most}]")


def votes_sample(rng: np.random.Generator, seq_len: int, vocab_size: int, alphabet: int) -> dict:
    """One vote-share sequence over `alphabet` keys -> the synthetic sample format."""
    lo, hi = ballot_range(vocab_size)
    keys = lo + 2 * rng.choice((hi - lo) // 2, size=alphabet, replace=False)  # a key's 0-vote token
    bias = rng.uniform(size=alphabet)
    drawn = rng.integers(alphabet, size=seq_len)
    votes = (rng.uniform(size=seq_len) < bias[drawn]).astype(np.int64)
    tokens = np.concatenate([[VOTES_BOS], keys[drawn] + votes])
    inputs = tokens[:-1]
    ones, cast = np.zeros(alphabet, dtype=np.int64), np.zeros(alphabet, dtype=np.int64)
    share = np.zeros(seq_len, dtype=np.int64)
    for t in range(1, seq_len):
        j = drawn[t - 1]
        ones[j] += votes[t - 1]
        cast[j] += 1
        share[t] = (2 * (COUNT_LABELS - 1) * ones[j] + cast[j]) // (2 * cast[j])  # rounded half up
    target_mask = np.arange(seq_len) >= 1
    return {
        "tokens": tokens,
        "targets": hi + share,
        "target_mask": target_mask,
        "need_id": np.where(target_mask, inputs - (inputs - lo) % 2, 0),  # the ballot's key
    }


def make_votes(seq_len: int, vocab_size: int, alphabets: list[int]):
    """-> rng -> a sample whose alphabet size (its difficulty) is drawn uniformly from `alphabets`."""

    def sample(rng: np.random.Generator) -> dict:
        m = int(rng.choice(alphabets))
        return {**votes_sample(rng, seq_len, vocab_size, m), "task": 2, "difficulty": m}

    return sample
