"""Alignment data: preference pairs (DPO family, reward models) and prompts (GRPO), read from .jsonl.

Preference records, as TRL reads them:
  {"prompt": "...", "chosen": "...", "rejected": "..."}                                  (plain text)
  {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
Plain text is tokenized as the model saw text in pretraining: [bos] prompt response eos, prompt and response
tokenized separately (so the prompt's tokens are the same in both responses and in a generated rollout).
Chat messages are rendered by the model's own template; a string response after a chat prompt is taken as
the assistant's reply. Only response tokens are scored.

A sequence is stored as `ids` (prompt + response tokens) and a `mask` that is True on response tokens;
rows are right-padded into (N, L) tensors and each batch is cut to its own longest sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cybertron.data.chat_template import Message, render, render_with_assistant_spans
from cybertron.data.hf import HF_DEFAULTS, HFOptions
from cybertron.data.records import read_records
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedSequence:
    """prompt + response token ids; mask[i] is True when ids[i] belongs to the response (is scored)."""

    ids: list[int]
    mask: list[bool]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def prompt_len(self) -> int:
        return self.mask.index(True) if True in self.mask else len(self.ids)


@dataclass
class PreferencePair:
    chosen: TokenizedSequence
    rejected: TokenizedSequence
    source: str  # "file:line", for error messages


@dataclass
class PromptRecord:
    """A GRPO prompt: its token ids, what the reward function sees as the prompt, and its other fields."""

    ids: list[int]
    prompt: str | list[Message]
    fields: dict[str, Any]
    source: str


def read_jsonl(path: str | Path, what: str,
               hf_options: HFOptions = HF_DEFAULTS) -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", record) for each non-empty line; DataError naming the line for anything not an object.
    Hugging Face data sets (hf:NAME, save_to_disk folders, .parquet) are read too (data/records.py)."""
    return read_records(path, what, hf_options)


def _messages(value: Any, where: str, name: str) -> list[Message]:
    if not value:
        raise DataError(f"{where}: '{name}' is empty")
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: each message of '{name}' needs a role in {ROLES} and a string content, "
                            f"got {m!r}"[:300])
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(record: dict[str, Any], where: str) -> str | list[Message]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        return prompt
    if isinstance(prompt, list):
        return _messages(prompt, where, "prompt")
    if prompt is None:
        raise DataError(f"{where}: missing 'prompt' (a string or a list of chat messages); keys are "
                        f"{sorted(record)}")
    raise DataError(f"{where}: 'prompt' must be a string or a list of chat messages, got "
                    f"{type(prompt).__name__}")


def _response(record: dict[str, Any], name: str, chat: bool, where: str) -> str | list[Message]:
    value = record.get(name)
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{name}' is empty")
        return [{"role": "assistant", "content": value}] if chat else value
    if isinstance(value, list):
        if not chat:
            raise DataError(f"{where}: '{name}' is a list of messages but 'prompt' is plain text; give both as "
                            "chat messages or both as strings")
        messages = _messages(value, where, name)
        if any(m["role"] != "assistant" for m in messages):
            raise DataError(f"{where}: '{name}' may hold assistant messages only (the prompt holds the rest)")
        if not any(m["content"].strip() for m in messages):
            raise DataError(f"{where}: '{name}' is empty")
        return messages
    if value is None:
        raise DataError(f"{where}: missing '{name}'; a preference record has 'prompt', 'chosen' and 'rejected'")
    raise DataError(f"{where}: '{name}' must be a string or a list of chat messages, got {type(value).__name__}")


def prompt_ids(tokenizer: TextTokenizer, prompt: str | list[Message]) -> list[int]:
    """Token ids a response continues: [bos] + text, or the chat render with the generation prompt."""
    if isinstance(prompt, str):
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return bos + tokenizer.encode(prompt)
    template = _template(tokenizer)
    text = render(template, prompt, True, tokenizer.bos_token or "", tokenizer.eos_token)
    return tokenizer.backend.encode(text, add_special_tokens=False).ids


def _template(tokenizer: TextTokenizer) -> str:
    if tokenizer.chat_template is None:
        raise DataError("chat-message records need the model's chat template, and this tokenizer has none; "
                        "give plain-text prompt/response strings instead")
    return tokenizer.chat_template


def tokenize_sequence(tokenizer: TextTokenizer, prompt: str | list[Message],
                      response: str | list[Message]) -> TokenizedSequence:
    if isinstance(prompt, str):
        head = prompt_ids(tokenizer, prompt)
        tail = tokenizer.encode(response) + [tokenizer.eos_id]
        return TokenizedSequence(head + tail, [False] * len(head) + [True] * len(tail))
    template = _template(tokenizer)
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token
    text, spans = render_with_assistant_spans(template, [*prompt, *response], bos, eos)
    prompt_chars = len(render(template, prompt, True, bos, eos))
    spans = [(lo, hi) for lo, hi in spans if lo >= prompt_chars]  # the response's turns, not the prompt's
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
    mask = np.zeros(len(encoding.ids), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return TokenizedSequence(list(encoding.ids), mask.tolist())


def truncate(seq: TokenizedSequence, max_len: int) -> TokenizedSequence:
    """At most max_len tokens: a long prompt keeps its end (at least half the budget stays with the prompt
    when the response alone is longer), then the response is cut."""
    if len(seq) <= max_len:
        return seq
    p = seq.prompt_len
    keep_prompt = min(p, max(max_len - (len(seq) - p), max_len // 2))
    ids = seq.ids[p - keep_prompt:][:max_len]
    mask = seq.mask[p - keep_prompt:][:max_len]
    return TokenizedSequence(ids, mask)


def read_preference_pairs(path: str | Path, tokenizer: TextTokenizer, max_len: int,
                          hf_options: HFOptions = HF_DEFAULTS) -> tuple[list[PreferencePair], int]:
    """(pairs, number cut to max_len). DataError naming the line for malformed or meaningless records."""
    pairs, n_truncated = [], 0
    for where, record in read_jsonl(path, "preference data", hf_options):
        prompt = _prompt(record, where)
        chat = isinstance(prompt, list)
        chosen, rejected = _response(record, "chosen", chat, where), _response(record, "rejected", chat, where)
        if chosen == rejected:
            raise DataError(f"{where}: 'chosen' and 'rejected' are identical, so the pair states no preference")
        try:
            full = (tokenize_sequence(tokenizer, prompt, chosen), tokenize_sequence(tokenizer, prompt, rejected))
        except DataError as err:
            raise type(err)(f"{where}: {err}") from err
        cut = tuple(truncate(s, max_len) for s in full)
        n_truncated += any(len(a) != len(b) for a, b in zip(full, cut))
        if not all(any(s.mask) for s in cut):
            raise DataError(f"{where}: no response token fits in data.seq_len={max_len}; raise it or shorten "
                            "the prompt")
        pairs.append(PreferencePair(cut[0], cut[1], where))
    if not pairs:
        raise DataError(f"preference data file {path} holds no records")
    return pairs, n_truncated


def read_prompts(path: str | Path, tokenizer: TextTokenizer, max_prompt_len: int,
                 hf_options: HFOptions = HF_DEFAULTS) -> tuple[list[PromptRecord], int]:
    """(GRPO prompts, number skipped for being longer than max_prompt_len tokens)."""
    records, skipped = [], 0
    for where, record in read_jsonl(path, "prompt data", hf_options):
        prompt = _prompt(record, where)
        try:
            ids = prompt_ids(tokenizer, prompt)
        except DataError as err:
            raise type(err)(f"{where}: {err}") from err
        if len(ids) > max_prompt_len:
            skipped += 1
            continue
        fields = {k: v for k, v in record.items() if k != "prompt"}
        records.append(PromptRecord(ids, prompt, fields, where))
    if not records:
        raise DataError(f"prompt data file {path} holds no prompt of at most {max_prompt_len} tokens "
                        f"({skipped} longer ones skipped)")
    return records, skipped


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val), a seeded split by record; val is empty when the fraction rounds to 0."""
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(len(items) * val_fraction) if len(items) > 1 else 0
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def pad_sequences(seqs: list[TokenizedSequence], pad_id: int, prefix: str,
                  width: int = 0) -> dict[str, torch.Tensor]:
    """{prefix_ids (N, L) int64, prefix_mask (N, L) bool, prefix_len (N,) int64}, right-padded to `width`
    (at least the longest sequence)."""
    width = max(width, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s.ids)
        mask[i, :len(s)] = torch.tensor(s.mask)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return {f"{prefix}_ids": ids, f"{prefix}_mask": mask, f"{prefix}_len": lengths}


def pair_rows(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    # One width for both sides: a preference step runs chosen and rejected as one batch.
    width = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    return {**pad_sequences([p.chosen for p in pairs], pad_id, "chosen", width),
            **pad_sequences([p.rejected for p in pairs], pad_id, "rejected", width)}


def trim_batch(batch: dict[str, torch.Tensor], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Cut every (N, L) sequence tensor to the longest sequence of this batch (rows were padded to the
    longest of the whole dataset), rounded up to a multiple of `multiple` (sequence parallelism splits the
    sequence into equal slices), padding with zeros past L: a zero mask scores nothing, every row keeps its
    length, and right padding changes no earlier position under causal attention. Host-side, before the
    batch moves to the device: no device sync."""
    prefixes = [k[:-4] for k in batch if k.endswith("_len")]
    width = max(int(batch[f"{p}_len"].max()) for p in prefixes)
    width = -(-width // multiple) * multiple
    return {k: _to_width(v, width) if v.dim() == 2 else v for k, v in batch.items()}


def _to_width(v: torch.Tensor, width: int) -> torch.Tensor:
    return v[:, :width] if v.shape[1] >= width else F.pad(v, (0, width - v.shape[1]))


@dataclass
class PreferenceData:
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor] | None
    n_pairs: int
    n_truncated: int
    sources: list[str] = field(default_factory=list)


def build_preference_data(path: str | Path, tokenizer: TextTokenizer, max_len: int, val_fraction: float,
                          seed: int, hf_options: HFOptions = HF_DEFAULTS) -> PreferenceData:
    pairs, n_truncated = read_preference_pairs(path, tokenizer, max_len, hf_options)
    train, val = split(pairs, val_fraction, seed)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return PreferenceData(pair_rows(train, pad_id), pair_rows(val, pad_id) if val else None, len(pairs),
                          n_truncated, [p.source for p in train])
