"""Data preparation time of a first and a second start on a large text corpus (fingerprint by file metadata).

    PYTHONPATH=$PWD python bench/data_restart.py --gb 1

Writes a corpus of --gb GiB of text (--files files of random words) to a temporary folder, then times
prepare_data (what `cybertron train` runs before the model is built) three times:
  first    cold cache: train the tokenizer on a sample, tokenize everything, write the shards;
  second   same corpus and settings: fingerprint (one stat per file), load tokenizer and shards from cache;
  verify   data.verify=true: the same, but the fingerprint hashes every byte (the old default did it twice).
Everything written (corpus and cache) is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cybertron.data.prepare import prepare_data


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


def timed_prepare(corpus: Path, cache: Path, verify: bool) -> tuple[float, bool]:
    start = time.perf_counter()
    data = prepare_data(str(corpus), "text", None, 4096, cache, val_fraction=0.05, seed=0, verify=verify)
    return time.perf_counter() - start, data.shards.cache_hit and data.tokenizer_cache_hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GiB")
    parser.add_argument("--files", type=int, default=64, help="files the corpus is split into")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the corpus and cache are written")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cybertron_restart_", dir=args.dir))
    try:
        t0 = time.perf_counter()
        size = write_corpus(root / "corpus", int(args.gb * 2**30), args.files)
        print(f"wrote {size / 2**30:.2f} GiB in {args.files} files in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {"corpus_gib": round(size / 2**30, 3), "files": args.files}
        for name, verify in [("first", False), ("second", False), ("verify", True)]:
            seconds, hit = timed_prepare(root / "corpus", root / "cache", verify)
            results[f"{name}_s"] = round(seconds, 4)
            print(f"{name:>6} start: {seconds:9.3f} s prepare_data (everything from cache: {hit})", flush=True)
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
