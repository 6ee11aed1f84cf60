"""Synthetic tasks with a known need: the shared vocabulary, the sample format, and the datasets.

Every sample is a dict of
- `tokens [L + 1]`: the sequence; its first token names the task (`RECALL_BOS`, `COUNT_BOS`,
  `VOTES_BOS`);
- `targets [L]`: what each input position predicts (the next token for recall, a count label for
  counting and votes), scored where `target_mask [L]` is set;
- `need_id [L]`: the ground truth of need. Query t needs the earlier positions s < t with
  need_id[s] == need_id[t] != 0 (`needed_mask` expands it);
- `task` (0 recall, 1 counting, 2 votes) and `difficulty` (key-value pairs, or alphabet size).

Vocabulary: 0 and 1 are the task tokens of recall and counting, [2, V - 16) the content tokens (keys,
values, symbols, fillers), the last 16 the count labels 0..15. Votes, which no mixture draws with the
others, takes 2 as its task token and its ballots from [3, V - 16).
"""

import numpy as np
import torch
from torch.utils.data import Dataset

RECALL_BOS, COUNT_BOS, VOTES_BOS = 0, 1, 2
TASKS = ("recall", "counting", "votes")
COUNT_LABELS = 16
CONTENT_START = 2


def content_range(vocab_size: int) -> tuple[int, int]:
    return CONTENT_START, vocab_size - COUNT_LABELS


def needed_mask(need_id: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """need_id [B, L], target_mask [B, L] -> bool [B, L, L]: query t (scored) needs key s."""
    L = need_id.shape[1]
    earlier = torch.ones(L, L, dtype=torch.bool, device=need_id.device).tril(-1)
    same = need_id[:, :, None] == need_id[:, None, :]
    return same & earlier & (need_id != 0)[:, :, None] & target_mask[:, :, None]


def log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    """An integer in [lo, hi], log-uniform: each octave of difficulty as likely."""
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


class TaskDataset(Dataset):
    """Samples of one task, or of the recall/counting mixture, drawn from (seed, split, index): a stream of
    fresh samples for training (`length` as large as the run needs), a fixed set for evaluation."""

    def __init__(self, make_sample, length: int, seed: tuple[int, ...], split: int):
        self.make_sample, self.length, self.seed, self.split = make_sample, length, seed, split

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.make_sample(np.random.default_rng((*self.seed, self.split, i)))
        return {k: torch.as_tensor(v) for k, v in sample.items()}


def make_mixture(recall, counting, recall_fraction: float = 0.5):
    """Two samplers -> one that draws each sequence's task first (recall with `recall_fraction`)."""

    def sample(rng: np.random.Generator) -> dict:
        return recall(rng) if rng.random() < recall_fraction else counting(rng)

    return sample
