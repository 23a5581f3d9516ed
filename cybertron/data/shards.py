"""Documents -> one flat token stream on disk (train.bin, val.bin, meta.json), tokenized once and reused.

Each document's tokens are followed by eos, so the loader can pack windows across document boundaries.
The cache directory is keyed by everything that determines its bytes (source content, tokenizer,
val_fraction, seed), so a changed input builds a new cache and an unchanged one loads in milliseconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cybertron.data.cache import atomic_directory, cache_key
from cybertron.data.hf import HF_DEFAULTS, HFOptions
from cybertron.data.sources import fingerprint_source, iter_documents
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError

SHARDS_FORMAT = 1  # bump when the on-disk layout changes, so old caches are not misread
TRAIN_FILE, VAL_FILE, META_FILE, STREAM_FILE = "train.bin", "val.bin", "meta.json", "all.bin"
_BATCH_CHARS = 2_000_000  # characters per encode_batch call: enough to keep all cores busy, bounded memory
_COPY_TOKENS = 1 << 24  # tokens copied per chunk when splitting the stream


@dataclass
class TokenShards:
    train: np.ndarray  # read-only memmap of token ids
    val: np.ndarray
    meta: dict
    cache_hit: bool  # True when loaded from the cache without tokenizing


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def build_or_load_shards(source_path: str | None, text_field: str, tokenizer: TextTokenizer,
                         cache_dir: Path, val_fraction: float, seed: int,
                         fingerprint: str | None = None, hf_options: HFOptions = HF_DEFAULTS) -> TokenShards:
    """Load the shards of (source, tokenizer, split) from cache_dir/shards/<key>/, building them if absent.
    `fingerprint`: the source's, when the caller has it already (fingerprint_source)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is out of range; use a value in [0, 1), e.g. 0.05")
    fingerprint = fingerprint or fingerprint_source(source_path, text_field, hf_options=hf_options)
    tokenizer_hash = tokenizer.content_hash()
    key = cache_key("shards", SHARDS_FORMAT, fingerprint, tokenizer_hash, float(val_fraction), seed)
    final = Path(cache_dir) / "shards" / key
    cached = _load_shards(final, cache_hit=True)
    if cached is not None:
        return cached
    if final.exists():  # damaged (truncated or edited by hand): rebuild, since publishing never overwrites
        shutil.rmtree(final)
    meta = {"format": SHARDS_FORMAT, "key": key, "source": str(source_path or "<default corpus>"),
            "text_field": text_field, "fingerprint": fingerprint, "tokenizer_hash": tokenizer_hash,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "seed": seed,
            "dtype": token_dtype(tokenizer.vocab_size).name, "val_fraction": float(val_fraction)}
    documents = iter_documents(source_path, text_field, hf_options)
    with atomic_directory(final) as tmp:
        meta.update(_write_shards(tmp, documents, tokenizer, val_fraction, seed))
        # The rename publishes the directory; meta.json is also written last, as a second guard.
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    loaded = _load_shards(final, cache_hit=False)
    assert loaded is not None, f"shards just written to {final} do not load"
    return loaded


def _load_shards(directory: Path, cache_hit: bool) -> TokenShards | None:
    """The shards in `directory`, or None when it is absent or does not match its meta.json."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        train = _map_tokens(directory / TRAIN_FILE, dtype, meta["train_tokens"])
        val = _map_tokens(directory / VAL_FILE, dtype, meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("format") != SHARDS_FORMAT:
        return None
    return TokenShards(train=train, val=val, meta=meta, cache_hit=cache_hit)


def _map_tokens(file: Path, dtype: np.dtype, count: int) -> np.ndarray:
    # A size check catches files truncated by a crash or edited by hand; such a cache is rebuilt.
    if file.stat().st_size != count * dtype.itemsize:
        raise ValueError(f"{file} size does not match meta.json")
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def _write_shards(directory: Path, documents: Iterable[str], tokenizer: TextTokenizer,
                  val_fraction: float, seed: int) -> dict:
    """Tokenize every document into one stream, then copy whole documents to train.bin or val.bin."""
    dtype = token_dtype(tokenizer.vocab_size)
    with open(directory / STREAM_FILE, "wb") as out:
        doc_lengths = _tokenize_to_file(documents, tokenizer, dtype, out)
    stream = np.memmap(directory / STREAM_FILE, dtype=dtype, mode="r")
    n_docs = len(doc_lengths)
    if n_docs == 1:
        n_val = _split_count(len(stream), val_fraction)
        train_ranges, val_ranges = [(0, len(stream) - n_val)], [(len(stream) - n_val, len(stream))]
        n_val_docs = 0
    else:
        is_val = _choose_val_documents(n_docs, val_fraction, seed)
        train_ranges, val_ranges = _token_ranges(doc_lengths, is_val)
        n_val_docs = int(is_val.sum())
    train_tokens = _copy_ranges(stream, train_ranges, directory / TRAIN_FILE)
    val_tokens = _copy_ranges(stream, val_ranges, directory / VAL_FILE)
    del stream
    (directory / STREAM_FILE).unlink()
    return {"documents": n_docs, "train_documents": n_docs - n_val_docs, "val_documents": n_val_docs,
            "single_document_split": n_docs == 1, "train_tokens": train_tokens, "val_tokens": val_tokens}


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, chars = [], 0
    for document in documents:
        batch.append(document)
        chars += len(document)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_to_file(documents: Iterable[str], tokenizer: TextTokenizer, dtype: np.dtype,
                      out: BinaryIO) -> np.ndarray:
    """Append each document's ids + eos to `out`; return each document's token count (eos included)."""
    lengths: list[int] = []
    eos = tokenizer.eos_id
    for batch in _batches(documents, _BATCH_CHARS):
        flat: list[int] = []
        for ids in tokenizer.encode_batch(batch):
            flat.extend(ids)
            flat.append(eos)
            lengths.append(len(ids) + 1)
        out.write(np.asarray(flat, dtype=dtype).tobytes())
    return np.asarray(lengths, dtype=np.int64)


def _split_count(n: int, val_fraction: float) -> int:
    """How many of n items go to validation: round(n * fraction), but at least 1 on each side if n >= 2."""
    if val_fraction == 0.0 or n < 2:
        return 0
    return min(max(round(n * val_fraction), 1), n - 1)


def _choose_val_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents: a seeded random subset, the same on every machine."""
    is_val = np.zeros(n_docs, dtype=bool)
    chosen = np.random.default_rng(seed).permutation(n_docs)[:_split_count(n_docs, val_fraction)]
    is_val[chosen] = True
    return is_val


def _token_ranges(doc_lengths: np.ndarray, is_val: np.ndarray) -> tuple[list, list]:
    """(start, end) token ranges of maximal runs of train and of val documents, in stream order."""
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)])
    run_starts = np.concatenate([[0], np.flatnonzero(np.diff(is_val)) + 1])
    run_ends = np.append(run_starts[1:], len(doc_lengths))
    train, val = [], []
    for start, end in zip(run_starts, run_ends):
        (val if is_val[start] else train).append((int(offsets[start]), int(offsets[end])))
    return train, val


def _copy_ranges(stream: np.ndarray, ranges: list[tuple[int, int]], file: Path) -> int:
    """Write stream[start:end] for each range to `file` in bounded chunks; return the token count."""
    total = 0
    with open(file, "wb") as out:
        for start, end in ranges:
            for chunk_start in range(start, end, _COPY_TOKENS):
                out.write(stream[chunk_start:min(end, chunk_start + _COPY_TOKENS)].tobytes())
            total += end - start
    return total
