"""The synthetic tasks a data module can draw, and their rules (checked before any work)."""

from adaptive_attn.data.counting import check_counting
from adaptive_attn.data.mqar import resolve_pairs
from adaptive_attn.data.synthetic import content_range
from adaptive_attn.data.votes import check_votes

SYNTHETIC_TASKS = ("recall", "counting", "recall_count", "votes")


def check_synthetic(task: str, seq_len: int, vocab_size: int, min_pairs, max_pairs, alphabets, count_cap) -> None:
    """The synthetic tasks' rules, before any work: ValueError naming the key."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"data.task={task!r} is invalid: choose one of {', '.join(SYNTHETIC_TASKS)}")
    if task == "votes":
        check_votes(list(alphabets), vocab_size)
        return
    lo, hi = content_range(vocab_size)
    if task != "counting":
        if hi - lo < seq_len:  # as Zoology: keys, values and fillers drawn from more tokens than positions
            raise ValueError(f"data.vocab_size={vocab_size} is invalid: must be >= seq_len + {lo + vocab_size - hi}")
        resolve_pairs(seq_len, min_pairs, max_pairs)
    if task != "recall":
        check_counting(list(alphabets), count_cap, vocab_size)
