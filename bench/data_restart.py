"""Data preparation time of a first and a second start on a large text corpus (content hash remembered by
file metadata).

    PYTHONPATH=$PWD python bench/data_restart.py --gb 1 --prepare-files 4

Writes a corpus of --gb GiB of text (--files files of random words) to a temporary folder, then times:
  fingerprint on the whole corpus: the content hash as the old code ran it at every start (twice), a first
  start (content hash once, remembered), a second start (one stat per file), and data.verify (hash again);
  prepare_data (what `cybertron train` runs before the model is built) on the first --prepare-files files:
  a first start (train the tokenizer, tokenize, write the shards) and a second one (everything from cache).
A second start's prepare_data is the fingerprint plus loading the tokenizer and memory-mapping the shards,
which does not grow with the corpus; tokenizing all of it is what a first start pays, and on a small
shared CPU that is what --prepare-files bounds (0 = every file). Everything written is deleted at the end
(--corpus reuses an existing folder of text files and leaves it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cybertron.data.prepare import FINGERPRINTS, prepare_data
from cybertron.data.sources import fingerprint_source


def write_corpus(folder: Path, total_bytes: int, n_files: int, seed: int = 0) -> int:
    """n_files UTF-8 files of random lower-case words in lines and paragraphs; returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    # A vocabulary of 20k words of Zipf-like frequency, so a BPE tokenizer has structure to learn.
    words = [bytes(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20_000)]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    per_file, written = total_bytes // n_files, 0
    folder.mkdir(parents=True)
    for i in range(n_files):
        with open(folder / f"part_{i:04d}.txt", "wb") as f:
            size = 0
            while size < per_file:
                picks = rng.choice(len(words), size=200_000, p=weights)
                text = b" ".join(words[j] for j in picks)
                text = text.replace(b" e ", b"\n").replace(b" t ", b"\n\n")  # lines and paragraphs
                f.write(text)
                size += len(text)
            written += size
    return written


def timed_prepare(corpus: Path, cache: Path) -> tuple[float, bool]:
    start = time.perf_counter()
    data = prepare_data(str(corpus), "text", None, 4096, cache, val_fraction=0.05, seed=0)
    return time.perf_counter() - start, data.shards.cache_hit and data.tokenizer_cache_hit


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
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cybertron_restart_", dir=args.dir))
    try:
        corpus = Path(args.corpus) if args.corpus else root / "corpus"
        if not args.corpus:
            t0 = time.perf_counter()
            write_corpus(corpus, int(args.gb * 2**30), args.files)
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
        for name in ("first", "second"):
            seconds, hit = timed_prepare(part, root / "cache")
            results[f"prepare_{name}_s"] = round(seconds, 4)
            print(f"{name:>6} start prepare_data: {seconds:9.3f} s on {part_size / 2**30:.3f} GiB "
                  f"(everything from cache: {hit})", flush=True)
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
