import json

import numpy as np
import pytest

from cybertron.data import shards as shards_module
from cybertron.data.cache import atomic_directory
from cybertron.data.shards import build_or_load_shards, token_dtype
from cybertron.data.tokenizer import TextTokenizer, train_bpe_tokenizer
from cybertron.errors import DataError

DOCS = [f"def function_{i}(x):\n    return x * {i} + {'y' * (i % 7)}\n" for i in range(40)]


class CountingTokenizer(TextTokenizer):
    """The real tokenizer, counting how often it is asked to encode (and optionally failing)."""

    def __init__(self, inner: TextTokenizer, fail_on_call: int | None = None):
        super().__init__(inner.backend, eos_token=inner.eos_token)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        return super().encode(text, add_special_tokens)

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # stands in for a run killed mid-tokenization
        return super().encode_batch(texts)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(DOCS, vocab_size=320)


def write_corpus(directory, docs=DOCS):
    directory.mkdir(exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"doc_{i:03d}.py").write_text(doc, encoding="utf-8")
    return str(directory)


def split_at_eos(tokens, eos):
    """The documents of a token stream, each as a tuple of ids without its eos."""
    docs, current = [], []
    for t in tokens.tolist():
        if t == eos:
            docs.append(tuple(current))
            current = []
        else:
            current.append(t)
    assert current == [], "stream must end with eos"
    return docs


def test_every_document_lands_once_in_train_or_val(tmp_path, tokenizer):
    source = write_corpus(tmp_path / "corpus")
    shards = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", 0.1, seed=0)
    train = split_at_eos(shards.train, tokenizer.eos_id)
    val = split_at_eos(shards.val, tokenizer.eos_id)
    expected = sorted(tuple(tokenizer.encode(d)) for d in DOCS)
    assert sorted(train + val) == expected
    assert len(val) == 4  # round(40 * 0.1)
    assert shards.meta["train_tokens"] == len(shards.train) and shards.meta["val_tokens"] == len(shards.val)
    assert shards.meta["documents"] == 40 and shards.meta["val_documents"] == 4
    assert shards.train.dtype == np.uint16 and not shards.train.flags.writeable
    assert not shards.cache_hit


def test_second_call_loads_the_cache_without_tokenizing(tmp_path, tokenizer):
    source = write_corpus(tmp_path / "corpus")
    first = build_or_load_shards(source, "text", CountingTokenizer(tokenizer), tmp_path / "cache", 0.1, 0)
    counting = CountingTokenizer(tokenizer)
    second = build_or_load_shards(source, "text", counting, tmp_path / "cache", 0.1, 0)
    assert second.cache_hit and not first.cache_hit
    assert counting.calls == 0
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert second.meta == first.meta


def test_split_is_deterministic_per_seed(tmp_path, tokenizer):
    source = write_corpus(tmp_path / "corpus")
    a = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache_a", 0.25, seed=1)
    b = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache_b", 0.25, seed=1)
    c = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache_a", 0.25, seed=2)
    assert not b.cache_hit and np.array_equal(a.val, b.val)
    assert not c.cache_hit and not np.array_equal(a.val, c.val)
    assert a.meta["key"] == b.meta["key"] != c.meta["key"]


@pytest.mark.parametrize("val_fraction, n_val", [(0.01, 1), (0.99, 1), (0.0, 0)])
def test_each_side_keeps_at_least_one_of_two_documents(tmp_path, tokenizer, val_fraction, n_val):
    source = write_corpus(tmp_path / "corpus", DOCS[:2])
    shards = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", val_fraction, 0)
    assert len(split_at_eos(shards.val, tokenizer.eos_id)) == n_val
    assert len(split_at_eos(shards.train, tokenizer.eos_id)) == 2 - n_val


def test_single_document_is_split_by_tokens(tmp_path, tokenizer):
    file = tmp_path / "one.txt"
    file.write_text("".join(DOCS), encoding="utf-8")
    shards = build_or_load_shards(str(file), "text", tokenizer, tmp_path / "cache", 0.2, 0)
    stream = tokenizer.encode("".join(DOCS)) + [tokenizer.eos_id]
    assert shards.meta["single_document_split"]
    assert len(shards.val) == round(0.2 * len(stream))
    assert np.concatenate([shards.train, shards.val]).tolist() == stream


def test_editing_the_source_builds_a_new_cache(tmp_path, tokenizer):
    source = write_corpus(tmp_path / "corpus")
    first = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", 0.1, 0)
    (tmp_path / "corpus" / "doc_000.py").write_text("x = 1\n", encoding="utf-8")
    second = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", 0.1, 0)
    assert not second.cache_hit and second.meta["key"] != first.meta["key"]
    assert len(second.train) + len(second.val) < len(first.train) + len(first.val)


def test_killed_build_leaves_nothing_that_is_trusted(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(shards_module, "_BATCH_CHARS", 200)  # several batches, so it dies mid-stream
    source = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_or_load_shards(source, "text", CountingTokenizer(tokenizer, fail_on_call=3), cache, 0.1, 0)
    assert list((cache / "shards").iterdir()) == []  # neither a final nor a temp directory remains
    counting = CountingTokenizer(tokenizer)
    rebuilt = build_or_load_shards(source, "text", counting, cache, 0.1, 0)
    assert not rebuilt.cache_hit and counting.calls > 3
    assert len(split_at_eos(np.concatenate([rebuilt.train, rebuilt.val]), tokenizer.eos_id)) == 40


def test_damaged_cache_is_rebuilt(tmp_path, tokenizer):
    source = write_corpus(tmp_path / "corpus")
    first = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", 0.1, 0)
    directory = tmp_path / "cache" / "shards" / first.meta["key"]
    expected = np.array(first.train)
    del first
    with open(directory / "train.bin", "r+b") as f:
        f.truncate(10)
    again = build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", 0.1, 0)
    assert not again.cache_hit
    assert np.array_equal(again.train, expected)
    assert json.loads((directory / "meta.json").read_text())["train_tokens"] == len(expected)


def test_publishing_keeps_a_copy_another_process_published_first(tmp_path):
    final = tmp_path / "entry"
    with atomic_directory(final) as tmp:
        (tmp / "data").write_text("mine", encoding="utf-8")
        final.mkdir()  # another process wins the race while we are still writing
        (final / "data").write_text("theirs", encoding="utf-8")
    assert (final / "data").read_text(encoding="utf-8") == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # our temp directory is gone


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(128256) == np.uint32


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_val_fraction_out_of_range_is_a_data_error(tmp_path, tokenizer, val_fraction):
    source = write_corpus(tmp_path / "corpus", DOCS[:2])
    with pytest.raises(DataError, match=f"val_fraction {val_fraction} is out of range"):
        build_or_load_shards(source, "text", tokenizer, tmp_path / "cache", val_fraction, 0)
