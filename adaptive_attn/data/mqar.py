"""Multi-query associative recall (MQAR) with a per-sequence difficulty.

A sequence first lists `n_pairs` key-value pairs (`k1 v1 k2 v2 ...`), then asks for keys again
(`k v` query pairs, keys drawn from the listed ones). The answers are the values that follow query
keys; only they are scored. Each sequence draws its own `n_pairs` (log-uniform in
[min_pairs, max_pairs]), which is its difficulty and is returned with the sample.

Keys are tokens [0, vocab_size / 2), values [vocab_size / 2, vocab_size).
"""

import numpy as np
import torch
from torch.utils.data import Dataset


class MQARDataset(Dataset):
    """Item: tokens [seq_len + 1] (int64), target_mask [seq_len] (bool, aligned with tokens[1:]), n_pairs."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, min_pairs: int, max_pairs: int, seed: int):
        if not 1 <= min_pairs <= max_pairs <= seq_len // 4:
            raise ValueError(
                f"data.min_pairs/max_pairs must satisfy 1 <= min_pairs <= max_pairs <= seq_len // 4 = {seq_len // 4}, "
                f"got {min_pairs}/{max_pairs}"
            )
        if max_pairs > vocab_size // 2:
            raise ValueError(f"data.max_pairs ({max_pairs}) must be <= vocab_size // 2 = {vocab_size // 2}")
        self.num_samples, self.seq_len, self.vocab_size = num_samples, seq_len, vocab_size
        self.min_pairs, self.max_pairs, self.seed = min_pairs, max_pairs, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, i))
        n_keys = self.vocab_size // 2
        n = int(round(np.exp(rng.uniform(np.log(self.min_pairs), np.log(self.max_pairs)))))
        keys = rng.choice(n_keys, size=n, replace=False)
        values = rng.integers(n_keys, self.vocab_size, size=n)
        n_queries = (self.seq_len + 1 - 2 * n) // 2
        asked = rng.integers(0, n, size=n_queries)
        context = np.stack([keys, values], 1).ravel()
        queries = np.stack([keys[asked], values[asked]], 1).ravel()
        tokens = np.concatenate([context, queries, keys[:1]])[: self.seq_len + 1]
        target_mask = np.zeros(self.seq_len, dtype=bool)
        target_mask[2 * n : 2 * n + 2 * n_queries : 2] = True  # query key positions predict their value
        return {
            "tokens": torch.from_numpy(tokens.astype(np.int64)),
            "target_mask": torch.from_numpy(target_mask),
            "n_pairs": torch.tensor(n),
        }
