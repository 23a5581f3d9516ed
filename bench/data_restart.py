"""Data preparation time of a first and a second start on a large text corpus (content hash remembered by
file metadata).

    PYTHONPATH=$PWD python bench/data_restart.py --gb 1 --prepare-files 4
    PYTHONPATH=$PWD python bench/data_restart.py --gb 1 --files 16 --jsonl --tokenizer-vocab 32000 --train-start

Writes a corpus of --gb GiB of text (--files files of random words; --jsonl: {"text": ...} records of about
400 words each) to a temporary folder, then times:
  fingerprint on the whole corpus: the content hash as the old code ran it at every start (twice), a first
  start (content hash once, remembered), a second start (one stat per file), and data.verify (hash again);
  prepare_data (what `cybertron train` runs before the model is built) on the first --prepare-files files:
  a first start (train the tokenizer, tokenize, write the shards) and a second one (everything from cache).
A second start's prepare_data is the fingerprint plus loading the tokenizer and memory-mapping the shards,
which does not grow with the corpus; tokenizing all of it is what a first start pays, and on a small
shared CPU that is what --prepare-files bounds (0 = every file). Everything written is deleted at the end
(--corpus reuses an existing folder of text files and leaves it).
--tokenizer-vocab N trains a BPE of N tokens on 8M characters of the corpus first (untimed) and gives it to
prepare_data as data.tokenizer does, so the first start only tokenizes; --train-start then times
`cybertron train --steps 1` on the prepared cache from the command's start to its first step's log line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cybertron.data.prepare import FINGERPRINTS, prepare_data
from cybertron.data.sources import fingerprint_source, iter_documents
from cybertron.data.tokenizer import train_bpe_tokenizer


def write_corpus(folder: Path, total_bytes: int, n_files: int, seed: int = 0, jsonl: bool = False) -> int:
    """n_files UTF-8 files of random lower-case words (lines of about 12 words); returns the bytes written.
    jsonl: each file holds {"text": document} records of about 400 words (a corpus as pretraining data sets
    ship), else each .txt file is one document."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    # A vocabulary of 20k words of Zipf-like frequency, so a BPE tokenizer has structure to learn.
    words = [bytes(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    with_space = np.array([w + b" " for w in words], dtype=object)
    with_newline = np.array([w + b"\n" for w in words], dtype=object)
    per_file, written = total_bytes // n_files, 0
    folder.mkdir(parents=True)
    for i in range(n_files):
        with open(folder / f"part_{i:04d}.{'jsonl' if jsonl else 'txt'}", "wb") as f:
            size = 0
            while size < per_file:
                picks = rng.choice(len(words), size=200_000, p=weights)
                # A line ends after about 12 words; a document after about 400.
                pieces = np.where(rng.random(len(picks)) < 1 / 12, with_newline[picks], with_space[picks])
                ends = np.flatnonzero(rng.random(len(picks)) < 1 / 400) + 1
                docs = [b"".join(pieces[lo:hi]).strip()
                        for lo, hi in zip(np.concatenate([[0], ends]), np.append(ends, len(picks)))]
                if jsonl:
                    text = "".join(json.dumps({"text": d.decode()}) + "\n" for d in docs if d).encode()
                else:
                    text = b"\n".join(docs)
                f.write(text)
                size += len(text)
            written += size
    return written


def timed_prepare(corpus: Path, cache: Path, tokenizer: Path | None = None) -> tuple[float, bool, int]:
    """(seconds, everything came from the cache, train tokens)."""
    start = time.perf_counter()
    data = prepare_data(str(corpus), "text", str(tokenizer) if tokenizer else None, 4096, cache,
                        val_fraction=0.05, seed=0)
    hit = data.shards.cache_hit and (tokenizer is not None or data.tokenizer_cache_hit)
    return time.perf_counter() - start, hit, data.train_tokens


def pretrained_tokenizer(corpus: Path, vocab_size: int, out: Path) -> Path:
    """A BPE trained on the corpus's first 8M characters, saved where data.tokenizer can point."""
    def sample():
        chars = 0
        for document in iter_documents(str(corpus), "text"):
            yield document
            chars += len(document)
            if chars >= 8_000_000:
                return
    train_bpe_tokenizer(sample(), vocab_size).save(out)
    return out


def train_start(corpus: Path, cache: Path, tokenizer: Path, out: Path) -> tuple[float, float]:
    """`cybertron train --steps 1` on a prepared cache: (seconds to its first step's log line, to its exit)."""
    command = [sys.executable, "-m", "cybertron", "train", "--data.path", str(corpus), "--data.tokenizer",
               str(tokenizer), "--data.cache_dir", str(cache), "--model.preset", "debug", "--steps", "1",
               "--train.global_batch_size", "4", "--data.seq_len", "128", "--eval.every", "0",
               "--log.progress", "lines", "--log.tensorboard", "false", "--checkpoint.every", "0", "--out", str(out)]
    start = time.perf_counter()
    first_step = float("nan")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        for line in proc.stdout:
            print("    | " + line.rstrip(), flush=True)
            if line.startswith("step 1/") and first_step != first_step:
                first_step = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"cybertron train failed ({proc.returncode})")
    return first_step, time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GiB")
    parser.add_argument("--files", type=int, default=64, help="files the corpus is split into")
    parser.add_argument("--prepare-files", type=int, default=0, help="files prepare_data runs on; 0 = all")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the corpus and cache are written")
    parser.add_argument("--corpus", default="", help="an existing folder of text files to use (kept)")
    parser.add_argument("--jsonl", action="store_true", help="write .jsonl records of ~400 words, not .txt files")
    parser.add_argument("--tokenizer-vocab", type=int, default=0,
                        help="train a tokenizer of this size first and prepare with it (0 = prepare_data trains one)")
    parser.add_argument("--train-start", action="store_true", help="also time `cybertron train --steps 1`")
    args = parser.parse_args()
    if args.train_start and not args.tokenizer_vocab:
        parser.error("--train-start needs --tokenizer-vocab (the command is given the tokenizer)")
    root = Path(tempfile.mkdtemp(prefix="cybertron_restart_", dir=args.dir))
    try:
        corpus = Path(args.corpus) if args.corpus else root / "corpus"
        if not args.corpus:
            t0 = time.perf_counter()
            write_corpus(corpus, int(args.gb * 2**30), args.files, jsonl=args.jsonl)
            print(f"wrote the corpus in {time.perf_counter() - t0:.0f} s", flush=True)
        files = sorted(corpus.iterdir())
        size = sum(f.stat().st_size for f in files)
        results = {"corpus_gib": round(size / 2**30, 3), "files": len(files)}
        index = root / "cache" / FINGERPRINTS
        for name, fn in [("old_start_two_content_hashes", lambda: [fingerprint_source(str(corpus), "text")
                                                                    for _ in range(2)]),
                         ("first_start_fingerprint", lambda: fingerprint_source(str(corpus), "text", index_dir=index)),
                         ("second_start_fingerprint", lambda: fingerprint_source(str(corpus), "text", index_dir=index)),
                         ("verify_fingerprint", lambda: fingerprint_source(str(corpus), "text", verify=True,
                                                                           index_dir=index))]:
            results[f"{name}_s"] = round(timed(fn), 4)
            print(f"{name:>30}: {results[f'{name}_s']:9.4f} s on {size / 2**30:.2f} GiB", flush=True)
        subset = files[:args.prepare_files] if args.prepare_files else files
        part = root / "prepare_corpus"
        part.mkdir()
        for f in subset:
            (part / f.name).symlink_to(f.resolve())
        part_size = sum(f.stat().st_size for f in subset)
        results["prepare_gib"] = round(part_size / 2**30, 3)
        tokenizer = None
        if args.tokenizer_vocab:
            t0 = time.perf_counter()
            tokenizer = pretrained_tokenizer(part, args.tokenizer_vocab, root / "tokenizer")
            print(f"trained a {args.tokenizer_vocab}-token tokenizer in {time.perf_counter() - t0:.1f} s (untimed)",
                  flush=True)
        for name in ("first", "second"):
            seconds, hit, tokens = timed_prepare(part, root / "cache", tokenizer)
            results[f"prepare_{name}_s"] = round(seconds, 4)
            results["train_tokens"] = tokens
            print(f"{name:>6} start prepare_data: {seconds:9.3f} s on {part_size / 2**30:.3f} GiB, {tokens:,} train "
                  f"tokens (everything from cache: {hit})", flush=True)
        if args.train_start:
            first_step, total = train_start(part, root / "cache", tokenizer, root / "run")
            results["train_start_to_first_step_s"], results["train_command_s"] = round(first_step, 2), round(total, 2)
            print(f"cybertron train --steps 1: first step logged after {first_step:.2f} s, exit after {total:.2f} s",
                  flush=True)
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
