"""One call from a data source to (tokenizer, token shards), each built once and cached under cache_dir."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cybertron.data.cache import atomic_directory, cache_key
from cybertron.data.hf import HF_DEFAULTS, HFOptions
from cybertron.data.mixture import parse_mix
from cybertron.data.shards import TokenShards, build_or_load_shards
from cybertron.data.sources import approx_source_chars, fingerprint_source, iter_documents
from cybertron.data.tokenizer import TOKENIZER_FILE, TextTokenizer, WordCutter, train_bpe_tokenizer
from cybertron.errors import DataError

# A BPE trained on the first 8M characters of the default corpus compresses held-out code almost as well as
# one trained on all of it, in a fraction of the time (bench/RESULTS.md); tokenizing dominates a cold run.
DEFAULT_TOKENIZER_TRAIN_CHARS = 8_000_000
FINGERPRINTS = "fingerprints"  # cache_dir's folder of content hashes remembered by file metadata
TOKENIZER_FORMAT = 1  # bump when the training recipe changes, so old cached tokenizers are not reused


@dataclass(frozen=True)
class SourcePart:
    """One source of the training data and its share of the samples (data.mix; a lone source has weight 1)."""

    path: str | None
    weight: float = 1.0
    text_field: str = "text"


def mix_parts(items: Sequence[dict], text_field: str) -> list[SourcePart]:
    """data.mix tables -> SourceParts; ConfigError naming the bad entry."""
    return [SourcePart(e.path, e.weight, e.option("text_field", text_field))
            for e in parse_mix(items, ("text_field",))]


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    shards: TokenShards  # the first part's (the only one without a mixture)
    tokenizer_cache_hit: bool  # True when a tokenizer trained earlier was loaded from the cache
    notes: tuple[str, ...] = ()  # lines worth showing the user (e.g. overlong words cut for tokenizer training)
    parts: tuple[TokenShards, ...] = ()  # every source's shards, in data.mix order
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        self.parts = self.parts or (self.shards,)
        self.weights = self.weights or (1.0,)

    @property
    def train_tokens(self) -> int:
        return sum(len(p.train) for p in self.parts)

    @property
    def val(self) -> np.ndarray:
        """Validation tokens of every source, one after another (a mixture is evaluated on all of them)."""
        return self.shards.val if len(self.parts) == 1 else np.concatenate([p.val for p in self.parts])


def prepare_data(source_path: str | None, text_field: str, tokenizer_path: str | None, vocab_size: int,
                 cache_dir: Path, val_fraction: float, seed: int,
                 tokenizer_train_chars: int = DEFAULT_TOKENIZER_TRAIN_CHARS, verify: bool = False,
                 hf_options: HFOptions = HF_DEFAULTS, mix: Sequence[SourcePart] = ()) -> PreparedData:
    """Tokenizer (loaded from tokenizer_path, else trained on the source and cached) + cached shards, one set
    per source of `mix` when given (instead of source_path).

    vocab_size and tokenizer_train_chars only matter when a tokenizer is trained. A source's content hash is
    remembered by its files' metadata, so a restart reads none of it; `verify` hashes it again.
    """
    parts = list(mix) or [SourcePart(source_path, 1.0, text_field)]
    fingerprints = [fingerprint_source(p.path, p.text_field, verify, hf_options, Path(cache_dir) / FINGERPRINTS)
                    for p in parts]
    cutter = WordCutter()
    if tokenizer_path:
        tokenizer, cache_hit = TextTokenizer.load(tokenizer_path), False
    else:
        tokenizer, cache_hit = load_or_train_tokenizer(parts, fingerprints, vocab_size, Path(cache_dir),
                                                       tokenizer_train_chars, cutter, hf_options)
    shards = [build_or_load_shards(p.path, p.text_field, tokenizer, Path(cache_dir), val_fraction, seed,
                                   fingerprint, hf_options)
              for p, fingerprint in zip(parts, fingerprints)]
    notes = tuple(note for note in [cutter.note()] if note)
    return PreparedData(tokenizer=tokenizer, shards=shards[0], tokenizer_cache_hit=cache_hit, notes=notes,
                        parts=tuple(shards), weights=tuple(float(p.weight) for p in parts))


def load_or_train_tokenizer(parts: Sequence[SourcePart], fingerprints: Sequence[str], vocab_size: int,
                            cache_dir: Path, tokenizer_train_chars: int, cutter: WordCutter | None = None,
                            hf_options: HFOptions = HF_DEFAULTS) -> tuple[TextTokenizer, bool]:
    """A BPE tokenizer trained on the sources, from cache_dir/tokenizers/<key>/ if there; (tokenizer, hit).
    Each source gives its weight's share of the training characters. `cutter` cuts overlong words for
    training and counts them (train_bpe_tokenizer)."""
    if tokenizer_train_chars < 1:
        raise DataError(f"tokenizer_train_chars {tokenizer_train_chars} must be >= 1; e.g. "
                        f"{DEFAULT_TOKENIZER_TRAIN_CHARS}")
    # A lone source keeps the key it always had, so existing caches stay valid.
    mixture = [] if len(parts) == 1 else [p.weight for p in parts]
    key = cache_key("tokenizer", TOKENIZER_FORMAT, *fingerprints, *mixture, vocab_size, tokenizer_train_chars)
    final = cache_dir / "tokenizers" / key
    if (final / TOKENIZER_FILE).is_file():
        try:
            return TextTokenizer.load(final), True
        except DataError:
            shutil.rmtree(final)  # damaged cache entry: train again
    total_weight = sum(p.weight for p in parts)

    def sample() -> Iterator[str]:
        for p in parts:
            chars = max(1, round(tokenizer_train_chars * p.weight / total_weight))
            yield from training_sample(iter_documents(p.path, p.text_field, hf_options), chars,
                                       approx_source_chars(p.path, hf_options))

    tokenizer = train_bpe_tokenizer(sample(), vocab_size, cutter)
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
