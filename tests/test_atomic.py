"""Cache and summary files are written whole, also by two processes at once (sweep lanes sharing a cache)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from adaptive_attn.data.atomic import write_atomically
from adaptive_attn.data.text import ByteTokenizer, tokenize_documents


def test_two_writers_of_one_file_both_finish_and_leave_one_whole_file(tmp_path):
    """Both writers have written their file before either renames it: with one shared temporary name the
    second rename would find nothing to move (a writer's error is raised here, by the pool)."""
    path, both_written = tmp_path / "cache" / "tokens.npy", threading.Barrier(2)

    def writer(value: int):
        def write(tmp):
            np.save(tmp, np.full(4, value))
            both_written.wait(timeout=10)

        write_atomically(path, write)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(writer, (1, 2)))
    assert np.load(path).tolist() in ([1] * 4, [2] * 4)
    assert [p.name for p in path.parent.iterdir()] == ["tokens.npy"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def write(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, write)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_concurrent_cache_misses_all_get_the_tokens(tmp_path):
    """Several callers miss the token cache together (as two sweep jobs starting at once): each gets the
    tokens, and the cache then holds them."""
    documents, tokenizer = [b"abc", b"de"], ByteTokenizer()
    all_missed = threading.Barrier(3)

    def make_documents():
        all_missed.wait(timeout=10)
        return documents

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: tokenize_documents("key", make_documents, tokenizer, tmp_path), range(3)))
    expected = tokenizer.encode_documents(documents)
    assert all(np.array_equal(r, expected) for r in results)
    assert np.array_equal(tokenize_documents("key", lambda: pytest.fail("cache missed"), tokenizer, tmp_path), expected)
