import json

import numpy as np
import pytest
import torch

from adaptive_attn.data import text
from adaptive_attn.data.datamodule import HFTextDataModule, TextDataModule
from adaptive_attn.lit.module import split_batch


def test_labels_are_shifted_exactly_once():
    tokens = torch.arange(11).repeat(2, 1)
    inputs, targets = split_batch({"tokens": tokens})
    assert inputs.shape == targets.shape == (2, 10)
    assert torch.equal(targets, inputs + 1)


def test_text_windows_hold_seq_len_plus_one_consecutive_tokens():
    corpus = np.arange(1000, dtype=np.uint16)
    windows = text.TokenWindows(corpus, seq_len=64)
    assert len(windows) == 999 // 64
    w0, w1 = windows[0]["tokens"], windows[1]["tokens"]
    assert w0.shape == (65,) and torch.equal(w0, torch.arange(65))
    assert w1[0] == w0[-1]  # windows tile the corpus: the last target of one is the first input of the next
    inputs, targets = split_batch({"tokens": w0[None]})
    assert torch.equal(targets[0], torch.arange(1, 65))


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        (root / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 3}" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # module {i}\n" * 20)
    return root


def test_text_split_is_deterministic_and_by_file(corpus, tmp_path):
    files = text.expand_paths([str(corpus)])
    a = text.split_files(files, val_percent=20)
    b = text.split_files(list(reversed(files)), val_percent=20)
    assert sorted(a["val"]) == sorted(b["val"]) and sorted(a["train"]) == sorted(b["train"])
    assert not set(a["val"]) & set(a["train"]) and len(a["val"]) + len(a["train"]) == len(files)

    dm = TextDataModule(seq_len=32, paths=[str(corpus)], val_percent=20, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    dm2 = TextDataModule(seq_len=32, paths=[str(corpus)], val_percent=20, cache_dir=str(tmp_path / "cache2"))
    dm2.setup()
    assert torch.equal(dm.splits["val"][0]["tokens"], dm2.splits["val"][0]["tokens"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"].shape == (dm.batch_size, 33) and int(batch["tokens"].max()) < text.BYTE_VOCAB


def test_bpe_tokenizer_is_trained_locally_and_cached(corpus, tmp_path):
    cache = tmp_path / "cache"
    dm = TextDataModule(
        seq_len=16, paths=[str(corpus)], tokenizer="bpe", vocab_size=300, val_percent=20, cache_dir=str(cache)
    )
    dm.setup()
    assert len(list(cache.glob("bpe-*.json"))) == 1
    tokens = dm.splits["train"].tokens
    assert tokens.max() < 300 and len(tokens) < sum(f.stat().st_size for f in text.expand_paths([str(corpus)]))
    again = TextDataModule(
        seq_len=16, paths=[str(corpus)], tokenizer="bpe", vocab_size=300, val_percent=20, cache_dir=str(cache)
    )
    again.setup()
    assert np.array_equal(again.splits["train"].tokens, tokens)


def test_missing_user_path_is_reported():
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        TextDataModule(seq_len=16, paths=["/does-not-exist"])


def test_hf_text_datamodule_reads_local_dataset_in_tinystories_format(tmp_path):
    root = tmp_path / "tinystories"
    root.mkdir()
    for split, n in (("train", 30), ("validation", 10)):
        rows = [{"text": f"Once upon a time there was a cat number {i}. It was happy."} for i in range(n)]
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = HFTextDataModule(seq_len=32, name=str(root), max_docs=None, batch_size=2)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["tokens"].shape == (2, 33)
    assert bytes(dm.splits["train"].tokens[:4].astype(np.uint8)) == b"Once"
