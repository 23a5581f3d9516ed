"""Perplexity of a model on text files, with the model's own tokenizer.

Each file is one token stream: its documents (a text file is one document; a .jsonl file one per line's "text",
read as training reads them) each followed by the end-of-text token, after one start token (bos, else eos) that
is context only. Perplexity is exp(mean negative log-likelihood) over every other token of the stream.

Windows: the stream is scored in chunks of `stride` target tokens; each chunk is predicted from a window of at
most `seq_len` input tokens ending just before its last target. stride == seq_len (the default) gives
non-overlapping windows: every token is predicted exactly once, from 0 to seq_len - 1 tokens of its own
window, as training's validation loss sees it. A smaller stride slides the window: each scored token then sees
at least seq_len - stride earlier tokens (a lower, more "long-context" perplexity) at seq_len / stride times
the compute."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cybertron.data.sources import iter_documents
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError
from cybertron.eval.scoring import Pair, score_continuations
from cybertron.models.llama import Transformer


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood (nats) over `tokens` scored tokens."""

    nll: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens": self.tokens}


def file_tokens(file: Path, tokenizer: TextTokenizer, text_field: str = "text") -> list[int]:
    """A file's token stream: a start token (bos, else eos), then each document and an end-of-text token."""
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    ids = [start]
    for document in iter_documents(str(file), text_field):
        ids += tokenizer.encode(document) + [tokenizer.eos_id]
    return ids


def windows(ids: Sequence[int], seq_len: int, stride: int) -> list[Pair]:
    """(context, targets) per chunk of `stride` targets, the context filling the window to at most seq_len
    inputs; together the chunks score every token but the first exactly once."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    pairs = []
    for first in range(1, len(ids), stride):
        end = min(first + stride, len(ids))
        begin = max(0, end - seq_len - 1)  # inputs are begin .. end - 2: at most seq_len of them
        pairs.append((ids[begin:first], ids[first:end]))
    return pairs


def perplexity(model: Transformer, ids: Sequence[int], seq_len: int, stride: int, batch_size: int) -> Perplexity:
    """Perplexity of one token stream (see the module docstring for the windows)."""
    if len(ids) < 2:
        raise DataError("the text has no token to score; give a file with some text")
    scores = score_continuations(model, windows(ids, seq_len, stride), batch_size)
    return Perplexity(-sum(logprob for logprob, _ in scores), len(ids) - 1)


def perplexity_of_files(model: Transformer, tokenizer: TextTokenizer, files: Sequence[Path], seq_len: int,
                        stride: int, batch_size: int, text_field: str = "text") -> dict:
    """{"files": {file: result}, "total": result over every scored token of every file}."""
    per_file = {}
    for file in files:
        ids = file_tokens(Path(file), tokenizer, text_field)
        if len(ids) < 2:
            raise DataError(f"{file} has no text to score")
        per_file[str(file)] = perplexity(model, ids, seq_len, stride, batch_size)
    total = Perplexity(sum(p.nll for p in per_file.values()), sum(p.tokens for p in per_file.values()))
    return {"files": {name: p.to_dict() for name, p in per_file.items()}, "total": total.to_dict()}
