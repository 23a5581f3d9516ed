"""One call from a data source to (tokenizer, token shards), each built once and cached under cache_dir."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cybertron.data.cache import atomic_directory, cache_key
from cybertron.data.shards import TokenShards, build_or_load_shards
from cybertron.data.sources import fingerprint_source, iter_documents, list_source_files
from cybertron.data.tokenizer import TOKENIZER_FILE, TextTokenizer, WordCutter, train_bpe_tokenizer
from cybertron.errors import DataError

# A BPE trained on the first 8M characters of the default corpus compresses held-out code almost as well as
# one trained on all of it, in a fraction of the time (bench/RESULTS.md); tokenizing dominates a cold run.
DEFAULT_TOKENIZER_TRAIN_CHARS = 8_000_000
TOKENIZER_FORMAT = 1  # bump when the training recipe changes, so old cached tokenizers are not reused


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    shards: TokenShards
    tokenizer_cache_hit: bool  # True when a tokenizer trained earlier was loaded from the cache
    notes: tuple[str, ...] = ()  # lines worth showing the user (e.g. overlong words cut for tokenizer training)


def prepare_data(source_path: str | None, text_field: str, tokenizer_path: str | None, vocab_size: int,
                 cache_dir: Path, val_fraction: float, seed: int,
                 tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS) -> PreparedData:
    """Tokenizer (loaded from tokenizer_path, else trained on the source and cached) + cached shards.

    vocab_size and tokenizer_train_chars only matter when a tokenizer is trained.
    """
    cutter = WordCutter()
    if tokenizer_path:
        tokenizer, cache_hit = TextTokenizer.load(tokenizer_path), False
    else:
        tokenizer, cache_hit = load_or_train_tokenizer(source_path, text_field, vocab_size, Path(cache_dir),
                                                       tokenizer_train_chars, cutter)
    shards = build_or_load_shards(source_path, text_field, tokenizer, Path(cache_dir), val_fraction, seed)
    notes = tuple(note for note in [cutter.note()] if note)
    return PreparedData(tokenizer=tokenizer, shards=shards, tokenizer_cache_hit=cache_hit, notes=notes)


def load_or_train_tokenizer(source_path: str | None, text_field: str, vocab_size: int, cache_dir: Path,
                            tokenizer_train_chars: int, cutter: WordCutter | None = None) -> tuple[TextTokenizer, bool]:
    """A BPE tokenizer trained on the source, from cache_dir/tokenizers/<key>/ if there; (tokenizer, hit).
    `cutter` cuts overlong words for training and counts them (train_bpe_tokenizer)."""
    if tokenizer_train_chars < 1:
        raise DataError(f"tokenizer_train_chars {tokenizer_train_chars} must be >= 1; e.g. "
                        f"{DEFAULT_TOKENIZER_TRAIN_CHARS}")
    fingerprint = fingerprint_source(source_path, text_field)
    key = cache_key("tokenizer", TOKENIZER_FORMAT, fingerprint, vocab_size, tokenizer_train_chars)
    final = cache_dir / "tokenizers" / key
    if (final / TOKENIZER_FILE).is_file():
        try:
            return TextTokenizer.load(final), True
        except DataError:
            shutil.rmtree(final)  # damaged cache entry: train again
    approx_chars = sum(f.stat().st_size for f in list_source_files(source_path))
    sample = training_sample(iter_documents(source_path, text_field), tokenizer_train_chars, approx_chars)
    tokenizer = train_bpe_tokenizer(sample, vocab_size, cutter)
    with atomic_directory(final) as tmp:
        tokenizer.save(tmp)
    # Load what was saved so a cold and a warm run hold the very same tokenizer (same content hash).
    return TextTokenizer.load(final), False


def training_sample(documents: Iterable[str], max_chars: int, approx_total_chars: int) -> Iterator[str]:
    """Whole documents spread evenly over the source (every k-th, k = total / max_chars, starting with
    the first), up to max_chars characters in all; the last one taken is cut to fit. Deterministic."""
    total = max(approx_total_chars, 1)
    remaining = max_chars
    for index, document in enumerate(documents):
        # Integer arithmetic: document i is taken when floor(i * max_chars / total) steps up.
        if index > 0 and index * max_chars // total == (index - 1) * max_chars // total:
            continue
        piece = document[:remaining]
        remaining -= len(piece)
        yield piece
        if remaining <= 0:
            return
