"""Supervised fine-tuning data: chat examples -> tokens with a loss mask -> packed rows -> batches.

Input is `.jsonl` (one example per line) or any data set data/records.py reads (Hugging Face `datasets`),
in OpenAI chat, ShareGPT, Alpaca or prompt/response format, tool calls included (data/sft_formats.py).
Every example is rendered through the model's own chat template, and only the tokens the assistant wrote
(its replies and their end-of-turn markers) carry loss. Several examples are packed into one row; each
restarts its positions at 0, which makes the model's attention block-diagonal, so a packed batch gives the
same per-token losses as one example per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cybertron.data.chat_template import ChatTemplateError, Message, render_with_assistant_spans
from cybertron.data.hf import HF_DEFAULTS, HFOptions
from cybertron.data.mixture import (
    MixEntry,
    Mixture,
    check_mixture_state,
    concat_rows,
    draw_sources,
    mixture_probabilities,
)
from cybertron.data.records import read_records
from cybertron.data.sft_formats import Conversation, to_conversation
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError

IGNORE_INDEX = -100  # the label value the loss skips (same as cybertron.train.losses.IGNORE_INDEX)


@dataclass
class Example:
    """One tokenized conversation: inputs[i] predicts labels[i] (IGNORE_INDEX where there is no loss)."""

    inputs: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.inputs)


def read_conversations(path: str | Path, fmt: str = "auto", hf_options: HFOptions = HF_DEFAULTS) -> list[list[Message]]:
    """Conversations from a data set; DataError naming the file and line (or record) for anything malformed."""
    return [c.messages for _, c in _read_numbered(path, fmt, hf_options)]


def _read_numbered(path: str | Path, fmt: str = "auto",
                   hf_options: HFOptions = HF_DEFAULTS) -> list[tuple[str, Conversation]]:
    """(where, conversation) pairs, so later errors (a template rejecting one) can name the line or record."""
    conversations = [(where, to_conversation(record, where, fmt))
                     for where, record in read_records(path, "SFT data", hf_options)]
    if not conversations:
        raise DataError(f"SFT data file {path} holds no examples")
    return conversations


def tokenize_conversation(tokenizer: TextTokenizer, messages: list[Message],
                          tools: list[dict] | None = None) -> Example:
    """Render with the tokenizer's chat template and mark each token the assistant wrote as a target.
    `tools`: the function definitions the template shows (conversations with tool calls)."""
    if tokenizer.chat_template is None:
        raise DataError("the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                        "chat_template.jinja); SFT renders examples through the model's own template")
    text, spans = render_with_assistant_spans(tokenizer.chat_template, messages, tokenizer.bos_token or "",
                                              tokenizer.eos_token, tools)
    for call in (c for m in messages for c in m.get("tool_calls") or ()):
        if call["function"]["name"] not in text:  # the template dropped the call: the model would learn nothing
            raise ChatTemplateError(f"the chat template does not render tool calls (the call to "
                                    f"{call['function']['name']!r} is missing from its output)")
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    # A token is the assistant's when its first character lies in an assistant span.
    starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
    is_target = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        is_target |= (starts >= lo) & (starts < hi)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], is_target[1:])]
    return Example(inputs=ids[:-1], labels=labels)


def tokenize_examples(tokenizer: TextTokenizer, conversations: list[list[Message]], max_len: int,
                      sources: list[str] | None = None,
                      tools: list[list[dict] | None] | None = None) -> tuple[list[Example], int]:
    """Tokenized examples cut to max_len, dropping those left without a target; (examples, n_truncated).
    `sources` (e.g. "file:line" per conversation) prefixes the error of a conversation that fails; `tools`
    gives each conversation's function definitions."""
    examples, truncated = [], 0
    for i, messages in enumerate(conversations):
        try:
            ex = tokenize_conversation(tokenizer, messages, tools[i] if tools else None)
        except DataError as err:
            if sources is None:
                raise
            raise type(err)(f"{sources[i]}: {err}") from err  # a ChatTemplateError stays one
        if len(ex) > max_len:
            ex, truncated = Example(ex.inputs[:max_len], ex.labels[:max_len]), truncated + 1
        if any(label != IGNORE_INDEX for label in ex.labels):
            examples.append(ex)
    return examples, truncated


def pack_examples(examples: list[Example], seq_len: int, pad_id: int, pack: bool = True) -> dict[str, torch.Tensor]:
    """Rows of seq_len tokens: {"inputs", "labels", "positions"} (N, seq_len) int64.

    Greedy packing in order: an example goes into the current row if it fits, else starts a new one
    (pack=False: one example per row). Padding has no loss, and its positions are all 0, which makes each
    pad token a document of its own that attends to nothing else."""
    rows: list[list[Example]] = []
    used = seq_len  # forces a new row for the first example
    for ex in examples:
        assert len(ex) <= seq_len, "examples are cut to seq_len before packing"
        if not pack or used + len(ex) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex)
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((len(rows), seq_len), dtype=torch.int64)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            inputs[r, at:at + n] = torch.tensor(ex.inputs)
            labels[r, at:at + n] = torch.tensor(ex.labels)
            positions[r, at:at + n] = torch.arange(n)
            at += n
    return {"inputs": inputs, "labels": labels, "positions": positions}


@dataclass
class SFTData:
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor] | None
    n_examples: int
    n_truncated: int
    mixture: Mixture | None = None  # data.mix: train holds each source's rows in turn


def build_sft_data(path: str | Path, tokenizer: TextTokenizer, seq_len: int, val_fraction: float, seed: int,
                   pack: bool = True, fmt: str = "auto", hf_options: HFOptions = HF_DEFAULTS) -> SFTData:
    """Read, tokenize, split (seeded, by example) and pack. A held-out set is kept when it gets >= 1 example."""
    numbered = _read_numbered(path, fmt, hf_options)
    examples, truncated = tokenize_examples(tokenizer, [c.messages for _, c in numbered], seq_len,
                                            [where for where, _ in numbered], [c.tools for _, c in numbered])
    if not examples:
        raise DataError(f"no example in {path} has an assistant token within data.seq_len={seq_len}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(len(examples) * val_fraction) if len(examples) > 1 else 0
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return SFTData(train=pack_examples(train, seq_len, pad_id, pack),
                   val=pack_examples(val, seq_len, pad_id, pack) if val else None,
                   n_examples=len(examples), n_truncated=truncated)


def build_sft_mixture(entries: list[MixEntry], tokenizer: TextTokenizer, seq_len: int, val_fraction: float,
                      seed: int, pack: bool = True, fmt: str = "auto",
                      hf_options: HFOptions = HF_DEFAULTS) -> SFTData:
    """data.mix: each source read (in its own data.format, else `fmt`), split and packed on its own, so a
    row holds examples of one source; train rows are drawn by weight (RowMixtureLoader), validation covers
    every source's held-out rows."""
    parts = [build_sft_data(e.path, tokenizer, seq_len, val_fraction, seed, pack, e.option("format", fmt),
                            hf_options) for e in entries]
    vals = [p.val for p in parts if p.val is not None]
    mixture = Mixture(tuple(p.train["inputs"].shape[0] for p in parts), tuple(e.weight for e in entries),
                      tuple(e.path for e in entries))
    return SFTData(concat_rows([p.train for p in parts]), concat_rows(vals) if vals else None,
                   sum(p.n_examples for p in parts), sum(p.n_truncated for p in parts), mixture)


class RowLoader:
    """Shuffled batches of packed rows, resumable: its whole state is the number of rows consumed
    (epoch e visits the rows in a permutation seeded by (seed, e))."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
        self.rows = rows
        self.n_rows = next(iter(rows.values())).shape[0]
        self.batch_size = batch_size
        self.seed = seed
        self.samples_consumed = 0
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs unless it is larger than the data
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
        return self._perms[epoch]

    def row_indices(self, slots: np.ndarray) -> np.ndarray:
        """The row at each position of the endless shuffled sequence: slot s is perm_{s // n}[s % n]."""
        epochs, at = np.divmod(np.asarray(slots, dtype=np.int64), self.n_rows)
        return np.array([self._permutation(int(e))[i] for e, i in zip(epochs, at)], dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        index = self.row_indices(np.arange(self.samples_consumed, self.samples_consumed + self.batch_size))
        self.samples_consumed += self.batch_size
        picked = torch.from_numpy(index)
        return {key: value[picked] for key, value in self.rows.items()}

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if "per_source" in state:
            raise DataError(f"the checkpoint's data loader mixed {len(state['per_source'])} sources (data.mix); "
                            "this run reads one; resume with the data.mix it was saved with")
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state["seed"])
        self._perms.clear()


class RowMixtureLoader:
    """Shuffled global batches of rows over weighted sources (RowLoader's interface), resumable: its state
    is the global sample count and how many samples each source has given. `rows` holds every source's rows,
    one source after another (Mixture.sizes)."""

    def __init__(self, rows: dict[str, torch.Tensor], mixture: Mixture, batch_size: int, seed: int = 0):
        self.probabilities = mixture_probabilities(len(mixture.sizes), mixture.weights)
        n_rows = next(iter(rows.values())).shape[0]
        assert sum(mixture.sizes) == n_rows, f"sources of {mixture.sizes} rows, {n_rows} rows given"
        for name, size in zip(mixture.names, mixture.sizes):
            if size == 0:
                raise DataError(f"data.mix {name}: no training rows (every record went to validation or was "
                                "dropped); give it more records or lower data.val_fraction")
        self.rows = rows
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.seed = seed
        self.samples_consumed = 0
        self.per_source = [0] * len(mixture.sizes)
        self._offsets = np.concatenate([[0], np.cumsum(mixture.sizes)[:-1]]).astype(np.int64)
        self._parts = [_source_rows(size, batch_size, seed + 1 + i) for i, size in enumerate(mixture.sizes)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        choices, slot_in_source = draw_sources(self.seed, self.samples_consumed, self.probabilities, self.batch_size,
                                        self.per_source)
        index = np.empty(self.batch_size, dtype=np.int64)
        for i, part in enumerate(self._parts):
            mine = choices == i
            index[mine] = self._offsets[i] + part.row_indices(slot_in_source[mine])
            self.per_source[i] += int(mine.sum())
        self.samples_consumed += self.batch_size
        picked = torch.from_numpy(index)
        return {key: value[picked] for key, value in self.rows.items()}

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed,
                "per_source": list(self.per_source), "weights": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the mixture must be the saved one (same sources and weights)."""
        check_mixture_state(state, len(self._parts), self.probabilities)
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state["seed"])
        self.per_source = [int(n) for n in state["per_source"]]
        self._parts = [_source_rows(part.n_rows, self.batch_size, self.seed + 1 + i)
                       for i, part in enumerate(self._parts)]


def _source_rows(size: int, batch_size: int, seed: int) -> RowLoader:
    """A RowLoader over one source's row count, used only for its permutation rule (row_indices)."""
    return RowLoader({"index": torch.empty(size, 0)}, batch_size, seed)


def row_loader(rows: dict[str, torch.Tensor], batch_size: int, seed: int,
               mixture: Mixture | None = None) -> RowLoader | RowMixtureLoader:
    """The loader of a finetune/align run: one source's RowLoader, or a RowMixtureLoader under data.mix."""
    return RowLoader(rows, batch_size, seed) if mixture is None else RowMixtureLoader(rows, mixture, batch_size, seed)


def eval_batches(rows: dict[str, torch.Tensor], batch_size: int, max_batches: int) -> list[dict[str, torch.Tensor]]:
    n = min(rows["inputs"].shape[0], batch_size * max_batches)
    return [{key: value[i:i + batch_size] for key, value in rows.items()} for i in range(0, n, batch_size)]
