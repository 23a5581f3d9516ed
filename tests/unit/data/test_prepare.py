import ast
from pathlib import Path

import numpy as np
import pytest

import cybertron.data
from cybertron.data.prepare import DEFAULT_TOKENIZER_TRAIN_CHARS, prepare_data, training_sample
from cybertron.data.sources import iter_documents
from cybertron.data.tokenizer import train_bpe_tokenizer
from cybertron.errors import DataError

DOCS = [f"class Thing{i}:\n    value = {i}\n\n    def get(self):\n        return self.value\n"
        for i in range(30)]


def write_corpus(directory: Path) -> str:
    directory.mkdir()
    for i, doc in enumerate(DOCS):
        (directory / f"mod_{i:02d}.py").write_text(doc, encoding="utf-8")
    return str(directory)


def prepare(source, cache, tokenizer_path=None, vocab_size=300):
    return prepare_data(source, "text", tokenizer_path, vocab_size, cache, val_fraction=0.1, seed=0,
                        tokenizer_train_chars=10_000)


def test_first_run_trains_and_builds_then_everything_is_cached(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    cold = prepare(source, tmp_path / "cache")
    warm = prepare(source, tmp_path / "cache")
    assert (cold.tokenizer_cache_hit, cold.shards.cache_hit) == (False, False)
    assert (warm.tokenizer_cache_hit, warm.shards.cache_hit) == (True, True)
    assert warm.tokenizer.content_hash() == cold.tokenizer.content_hash()
    assert np.array_equal(warm.shards.train, cold.shards.train)
    saved = list((tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json"))
    assert len(saved) == 1
    assert cold.tokenizer.decode(cold.shards.val.tolist()).count("<|endoftext|>") == 3  # 10% of 30 docs


def test_another_vocab_size_trains_another_tokenizer(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    small = prepare(source, tmp_path / "cache", vocab_size=280)
    large = prepare(source, tmp_path / "cache", vocab_size=320)
    assert not large.tokenizer_cache_hit and not large.shards.cache_hit
    assert small.tokenizer.vocab_size < large.tokenizer.vocab_size
    assert len(small.shards.train) > len(large.shards.train)  # more merges, fewer tokens


def test_a_given_tokenizer_is_used_as_is(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    given = train_bpe_tokenizer(DOCS[:5], vocab_size=270)
    given.save(tmp_path / "tok")
    prepared = prepare(source, tmp_path / "cache", tokenizer_path=str(tmp_path / "tok"), vocab_size=9999)
    assert prepared.tokenizer.content_hash() == given.content_hash()
    assert not prepared.tokenizer_cache_hit
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(str(tmp_path / "missing"), tmp_path / "cache")


def test_training_sample_spreads_over_the_source_within_budget():
    docs = [f"{i:04d}" + "x" * 96 for i in range(100)]  # 100 docs of 100 chars
    sample = list(training_sample(docs, max_chars=1000, approx_total_chars=10_000))
    assert [s[:4] for s in sample] == [f"{i:04d}" for i in range(0, 100, 10)]  # every 10th document
    assert sum(map(len, sample)) == 1000
    assert list(training_sample(["a" * 50], max_chars=20, approx_total_chars=50)) == ["a" * 20]
    assert list(training_sample(docs[:3], max_chars=10**6, approx_total_chars=300)) == docs[:3]


def test_data_package_never_imports_torch_distributed():
    package = Path(cybertron.data.__file__).parent
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            assert not any(n.startswith("torch.distributed") for n in names), f"{file.name} imports {names}"


@pytest.mark.slow
def test_default_corpus_prepares_cold_then_warm(tmp_path):
    cold = prepare_data(None, "text", None, 4096, tmp_path, 0.05, 0, DEFAULT_TOKENIZER_TRAIN_CHARS)
    warm = prepare_data(None, "text", None, 4096, tmp_path, 0.05, 0, DEFAULT_TOKENIZER_TRAIN_CHARS)
    assert warm.tokenizer_cache_hit and warm.shards.cache_hit and not cold.shards.cache_hit
    assert cold.shards.meta["train_tokens"] > 5_000_000 and cold.shards.meta["val_tokens"] > 100_000
    val = cold.shards.val
    first_doc = val[:int(np.flatnonzero(val == cold.tokenizer.eos_id)[0])].tolist()
    assert cold.tokenizer.decode(first_doc) in set(iter_documents(None))
