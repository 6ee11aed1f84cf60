"""Lightning data modules over MQAR, local text files and Hugging Face text datasets."""

import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from adaptive_attn.data import text
from adaptive_attn.data.counting import make_counting
from adaptive_attn.data.domains import TEXT_DOMAINS, domain_documents
from adaptive_attn.data.mqar import make_mqar, resolve_pairs
from adaptive_attn.data.synthetic import TaskDataset, make_mixture
from adaptive_attn.data.tasks import check_synthetic
from adaptive_attn.data.text import check_tokenizer
from adaptive_attn.data.votes import make_votes


class ResumableRandomSampler(Sampler[int]):
    """Shuffles with a permutation fixed by (seed, epoch) and can start part-way through an epoch, so
    a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have seen.
    Lightning calls `set_epoch` at each epoch start."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.resume_epoch, self.resume_skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start epoch `epoch` at its `skip`-th sample."""
        self.epoch, self.resume_epoch, self.resume_skip = epoch, epoch, skip

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        start = self.resume_skip if self.epoch == self.resume_epoch else 0
        yield from perm[start:].tolist()


class LMDataModule(L.LightningDataModule):
    """Batches of {"tokens": [B, seq_len + 1], optional "target_mask": [B, seq_len], ...}."""

    def __init__(self, seq_len: int, vocab_size: int, batch_size: int = 16, num_workers: int = 0):
        super().__init__()
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.splits: dict[str, Dataset] = {}
        self._resume_step = 0

    def build(self) -> dict[str, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.build()

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=sampler is not None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        n = len(self.splits["train"])
        sampler = ResumableRandomSampler(n, seed=torch.initial_seed())
        per_epoch = max(1, n // self.batch_size)
        sampler.resume_at(self._resume_step // per_epoch, (self._resume_step % per_epoch) * self.batch_size)
        return self._loader("train", sampler)

    def state_dict(self) -> dict:
        """Saved in checkpoints: the step reached, from which the sampler's position follows."""
        return {"global_step": self.trainer.global_step if self.trainer is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        self._resume_step = state.get("global_step", 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class SyntheticDataModule(LMDataModule):
    """`task`: `recall` (MQAR, Zoology's generator), `counting`, `recall_count` (each sequence either,
    with `recall_fraction`), or `votes` (vote share, over `alphabets`). Training draws a fresh sample at
    every index of a stream seeded by (data_seed, the run's seed), `train_steps` batches long; validation
    and test are fixed sets of `num_val` samples seeded by data_seed alone, the same for every run."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = 8192,
        task: str = "recall",
        min_pairs: int | None = None,
        max_pairs: int | None = None,
        power_a: float = 0.01,
        alphabets: list[int] = (2, 4, 8, 16, 32),
        count_cap: int = 15,
        recall_fraction: float = 0.5,
        train_steps: int = 1000,
        num_val: int = 512,
        data_seed: int = 1234,
        **kwargs,
    ):
        super().__init__(seq_len, vocab_size, **kwargs)
        check_synthetic(task, seq_len, vocab_size, min_pairs, max_pairs, alphabets, count_cap)
        self.task, self.train_steps, self.num_val, self.data_seed = task, train_steps, num_val, data_seed
        if task == "votes":
            self.make_sample = make_votes(seq_len, vocab_size, list(alphabets))
            return
        recall = counting = None
        if task != "counting":
            recall = make_mqar(seq_len, vocab_size, *resolve_pairs(seq_len, min_pairs, max_pairs), power_a)
        if task != "recall":
            counting = make_counting(seq_len, vocab_size, list(alphabets), count_cap)
        self.make_sample = (
            make_mixture(recall, counting, recall_fraction) if task == "recall_count" else recall or counting
        )

    def build(self) -> dict[str, Dataset]:
        stream = self.batch_size * self.train_steps
        return {
            "train": TaskDataset(self.make_sample, stream, (self.data_seed, torch.initial_seed()), split=0),
            "val": TaskDataset(self.make_sample, self.num_val, (self.data_seed,), split=1),
            "test": TaskDataset(self.make_sample, self.num_val, (self.data_seed,), split=2),
        }


class TextDataModule(LMDataModule):
    """Local text: the standard library's sources by default, or `paths`; `tokenizer` = byte | bpe."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = text.BYTE_VOCAB,
        paths: list[str] | None = None,
        tokenizer: str = "byte",
        val_percent: float = 2.0,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(seq_len, vocab_size, **kwargs)
        check_tokenizer(tokenizer, vocab_size)
        self.files = text.text_files(text.expand_paths(list(paths)) if paths else text.stdlib_files())
        self.tokenizer, self.val_percent = tokenizer, val_percent
        self.cache_dir = Path(cache_dir) if cache_dir else text.CACHE_DIR

    def build(self) -> dict[str, Dataset]:
        files = text.split_files(self.files, self.val_percent)
        if self.tokenizer == "bpe":
            tok = text.BPETokenizer(files["train"], self.vocab_size, self.cache_dir)
        else:
            tok = text.ByteTokenizer()
        train = text.tokenize_files(files["train"], tok, self.cache_dir)
        if files["val"]:
            val = text.tokenize_files(files["val"], tok, self.cache_dir)
        else:  # a single file: its last val_percent (at least two windows) is held out
            held_out = max(2 * (self.seq_len + 1), int(len(train) * self.val_percent / 100))
            train, val = train[:-held_out], train[-held_out:]
        half = len(val) // 2  # val and test: the two halves of the held-out tokens
        return {
            "train": text.TokenWindows(train, self.seq_len),
            "val": text.TokenWindows(val[:half], self.seq_len),
            "test": text.TokenWindows(val[half:], self.seq_len),
        }


class TextDomainsDataModule(LMDataModule):
    """Text of several complexities (`domains`: code, prose, repetitive; see `domains.py`), byte-level.
    Training windows come from all of them; validation and test windows alternate between them and
    carry their domain, so each domain gets its own loss."""

    def __init__(
        self, seq_len: int, vocab_size: int = text.BYTE_VOCAB, domains=TEXT_DOMAINS, val_percent=2.0, **kwargs
    ):
        super().__init__(seq_len, vocab_size, **kwargs)
        unknown = [d for d in domains if d not in TEXT_DOMAINS]
        if unknown or not domains:
            raise ValueError(f"data.domains={list(domains)!r} is invalid: choose from {', '.join(TEXT_DOMAINS)}")
        self.domains, self.val_percent = list(domains), val_percent

    def build(self) -> dict[str, Dataset]:
        tok, parts = text.ByteTokenizer(), {"train": [], "val": [], "test": []}
        version = f"{sys.version_info.major}.{sys.version_info.minor}-{self.val_percent}"
        for name in self.domains:
            docs = functools.cache(lambda name=name: domain_documents(name))
            split = {}
            for part in ("train", "val"):

                def pick(part=part, docs=docs):
                    return [d for key, d in docs() if text.split_of(key, self.val_percent) == part]

                split[part] = text.tokenize_documents(f"{name}-{part}-{version}", pick, tok)
            half, domain = len(split["val"]) // 2, TEXT_DOMAINS.index(name)
            parts["train"].append(text.TokenWindows(split["train"], self.seq_len))
            parts["val"].append(text.TokenWindows(split["val"][:half], self.seq_len, domain))
            parts["test"].append(text.TokenWindows(split["val"][half:], self.seq_len, domain))
        train = parts.pop("train")
        return {"train": ConcatDataset(train), **{k: text.Interleaved(v) for k, v in parts.items()}}


class HFTextDataModule(LMDataModule):
    """A Hugging Face text dataset (default TinyStories); `name` may be a hub name or a local directory."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = text.BYTE_VOCAB,
        name: str = "roneneldan/TinyStories",
        text_field: str = "text",
        val_split: str = "validation",
        max_docs: int | None = 20000,
        **kwargs,
    ):
        super().__init__(seq_len, vocab_size, **kwargs)
        check_tokenizer("byte", vocab_size)
        self.name, self.text_field, self.val_split, self.max_docs = name, text_field, val_split, max_docs

    def build(self) -> dict[str, Dataset]:
        tok = text.ByteTokenizer()
        splits = {}
        for split, hf_split in (("train", "train"), ("val", self.val_split)):
            docs = text.load_hf_texts(self.name, hf_split, self.text_field, self.max_docs)
            splits[split] = text.TokenWindows(tok.encode_documents(docs), self.seq_len)
        splits["test"] = splits["val"]
        return splits
