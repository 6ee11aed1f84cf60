"""Text corpora, tokenised and packed into `seq_len + 1` windows.

Offline by default: the Python standard library's own source files (~30 MB of real code with
long-range structure, present in every Python install), or the user's files (`data.paths`).
Byte-level tokens by default (256 bytes + an end-of-document token); optionally a byte-level BPE
trained locally with `tokenizers`. Token arrays are cached on disk. The split is by file, decided by a
hash of the file's path, so it is deterministic and independent of file order.
`load_hf_texts` reads a Hugging Face dataset (TinyStories by default) when online, or a local copy.
"""

import hashlib
import sys
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from adaptive_attn.data.atomic import write_atomically

BYTE_VOCAB = 257
END_OF_DOC = 256
CACHE_DIR = Path.home() / ".cache" / "adaptive_attn"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def expand_paths(paths: list[str]) -> list[Path]:
    """Files and directories (searched recursively) -> sorted list of files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data.paths: {p} does not exist")
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return files


def split_of(key, val_percent: float) -> str:
    """A file's (or document's) split, from a hash of its path (or key): independent of order."""
    return "val" if zlib.crc32(str(key).encode()) % 1000 < val_percent * 10 else "train"


def is_text(path: Path) -> bool:
    """UTF-8 without NUL bytes: sources, prose, data in text form; not bytecode, images or other encodings."""
    data = path.read_bytes()
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def text_files(files: list[Path]) -> list[Path]:
    """The files that are text (see `is_text`); one line says how many others were skipped."""
    kept = [f for f in files if is_text(f)]
    skipped = sorted(set(files) - set(kept))
    if skipped:
        print(
            f"data: skipped {len(skipped)} of {len(files)} files that are not UTF-8 text, e.g. {skipped[0]}",
            file=sys.stderr,
        )
    if not kept:
        raise ValueError(f"data.paths: none of the {len(files)} files is UTF-8 text")
    return kept


def split_files(files: list[Path], val_percent: float) -> dict[str, list[Path]]:
    """Files -> train and val by a hash of each path. A small corpus where one side would be empty gives
    that side the file whose hash is lowest. A single file goes to train, and the data module splits it by
    tokens."""
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    if len(files) == 1:
        return {"train": list(files), "val": []}
    for f in files:
        splits[split_of(f, val_percent)].append(f)
    for empty, full in (("val", "train"), ("train", "val")):
        if not splits[empty] and len(splits[full]) > 1:
            moved = min(splits[full], key=lambda f: zlib.crc32(str(f).encode()))
            splits[full].remove(moved)
            splits[empty].append(moved)
    return splits


def check_tokenizer(tokenizer: str, vocab_size: int) -> None:
    """The text tokenizer's rule; ValueError naming the key."""
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"data.tokenizer={tokenizer!r} is invalid: choose byte or bpe")
    if tokenizer == "byte" and vocab_size != BYTE_VOCAB:
        raise ValueError(f"data.vocab_size={vocab_size} is invalid: the byte tokenizer has {BYTE_VOCAB} tokens")


class ByteTokenizer:
    vocab_size = BYTE_VOCAB
    eos_id = END_OF_DOC
    name = "byte"

    def encode_documents(self, texts: list[bytes]) -> np.ndarray:
        parts = []
        for t in texts:
            parts += [np.frombuffer(t, dtype=np.uint8).astype(np.uint16), np.array([END_OF_DOC], np.uint16)]
        return np.concatenate(parts)


class BPETokenizer:
    """Byte-level BPE trained locally on the training files; cached by corpus and vocab size."""

    def __init__(self, train_files: list[Path], vocab_size: int, cache_dir: Path = CACHE_DIR):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        self.vocab_size, self.name = vocab_size, f"bpe{vocab_size}"
        path = cache_dir / f"bpe-{corpus_key(train_files)}-{vocab_size}.json"
        if path.exists():
            self.tok = Tokenizer.from_file(str(path))
        else:
            self.tok = Tokenizer(models.BPE())
            self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            self.tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, special_tokens=["<|eod|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            )
            self.tok.train([str(f) for f in train_files], trainer)
            write_atomically(path, lambda tmp: self.tok.save(str(tmp)))
        self.eos_id = self.tok.token_to_id("<|eod|>")

    def encode_documents(self, texts: list[bytes]) -> np.ndarray:
        encoded = self.tok.encode_batch([t.decode("utf-8", errors="replace") for t in texts])
        return np.concatenate([np.array(e.ids + [self.eos_id], dtype=np.uint16) for e in encoded])


def corpus_key(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenize_files(files: list[Path], tokenizer, cache_dir: Path = CACHE_DIR) -> np.ndarray:
    """Tokens of all files, each followed by end-of-document; cached as .npy."""

    def read() -> list[bytes]:
        return [f.read_bytes() for f in tqdm(files, desc=f"reading {len(files)} files", leave=False)]

    return tokenize_documents(corpus_key(files), read, tokenizer, cache_dir)


def tokenize_documents(key: str, make_documents, tokenizer, cache_dir: Path = CACHE_DIR) -> np.ndarray:
    """Tokens of the documents `make_documents()` returns, each followed by end-of-document; cached as .npy
    under `key` (make_documents runs only when the cache misses)."""
    path = cache_dir / f"tokens-{tokenizer.name}-{key}.npy"
    if path.exists():
        return np.load(path)
    tokens = tokenizer.encode_documents(make_documents())
    write_atomically(path, lambda tmp: np.save(tmp, tokens))
    return tokens


def load_hf_texts(name: str, split: str, text_field: str = "text", max_docs: int | None = None) -> list[bytes]:
    """Documents of a Hugging Face dataset split (a hub name when online, or a local directory)."""
    from datasets import load_dataset

    ds = load_dataset(name, split=split)
    if max_docs is not None:
        ds = ds.select(range(min(max_docs, len(ds))))
    return [t.encode() for t in ds[text_field]]


class TokenWindows(Dataset):
    """Non-overlapping windows of `seq_len + 1` tokens; the model shifts them into inputs/targets. With a
    `domain` (an index into the text domains) every window says which it is."""

    def __init__(self, tokens: np.ndarray, seq_len: int, domain: int | None = None):
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"seq_len={seq_len} is too long for this corpus: a split holds {len(tokens)} tokens, fewer than "
                "seq_len + 1 (give more text with data.paths, or a shorter seq_len)"
            )
        self.tokens, self.seq_len, self.domain = tokens, seq_len, domain

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1]
        item = {"tokens": torch.from_numpy(window.astype(np.int64))}
        return item if self.domain is None else {**item, "domain": torch.tensor(self.domain)}


class Interleaved(Dataset):
    """The items of several datasets in turn (0, 1, 2, 0, 1, 2, ...), as many rounds as the shortest
    holds: a validation run limited to its first batches still sees every dataset alike."""

    def __init__(self, datasets: list[Dataset]):
        self.datasets, self.rounds = datasets, min(len(d) for d in datasets)

    def __len__(self) -> int:
        return self.rounds * len(self.datasets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[i % len(self.datasets)][i // len(self.datasets)]
