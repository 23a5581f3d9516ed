"""Text <-> token ids through Hugging Face `tokenizers`: train a byte-level BPE, or load any tokenizer.json.

A `TextTokenizer` is a `tokenizers.Tokenizer` plus what the rest of cybertron needs to know about it:
which id ends a document (eos), the optional bos/pad ids, and the chat template of an instruct model.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from cybertron.errors import DataError
from cybertron.files import atomic_file, copy_file_atomic, write_text_atomic

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers versions save the template here
ENDOFTEXT = "<|endoftext|>"
# Files of an HF directory that describe its tokenizer; copied into run dirs and exported directories.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, "special_tokens_map.json", CHAT_TEMPLATE_FILE,
                   "generation_config.json")
# Without a tokenizer_config.json, eos/bos are recognised by the names the common model families use.
COMMON_EOS_TOKENS = (ENDOFTEXT, "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
COMMON_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
_N_BYTES = 256
# The BPE trainer's work on one pre-tokenized word grows faster than its length (a run of one repeated
# character is the worst case), so a data file holding one huge line without whitespace stalls training.
# Longer runs reach the trainer cut into pieces of this many characters; no useful token is this long.
MAX_TRAIN_WORD_CHARS = 1000


class TextTokenizer:
    """A `tokenizers.Tokenizer` with known special tokens; encodes without adding them unless asked."""

    def __init__(self, tokenizer: Tokenizer, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, name: str = "tokenizer"):
        self._tokenizer = tokenizer
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self._eos_id = _require_token_id(tokenizer, eos_token, name)
        self._bos_id = _require_token_id(tokenizer, bos_token, name) if bos_token else None
        self._pad_id = _require_token_id(tokenizer, pad_token, name) if pad_token else None

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for callers that need offsets or other raw features."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once: the Rust encoder spreads them over all cores, and unlike `encode` it
        releases the GIL meanwhile (so a server thread encoding a huge prompt does not stall the others)."""
        # encode_batch_fast skips computing offsets (tokenizers >= 0.20); same ids, less work.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # numpy arrays and tensors hold numpy/torch scalars, which the Rust side does not accept as ints.
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def content_hash(self) -> str:
        """sha256 of the serialized tokenizer and its eos: identifies the token ids it produces."""
        digest = hashlib.sha256(self._tokenizer.to_str().encode())
        digest.update(f"\0eos={self.eos_token}".encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write `path` if it names a .json file, else tokenizer.json + tokenizer_config.json into directory
        `path` (the Hugging Face layout, so `transformers.AutoTokenizer` loads it too).

        Returns the path of the tokenizer.json written."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        with atomic_file(file) as tmp:  # each file appears whole or not at all
            self._tokenizer.save(str(tmp))
        if path.suffix != ".json":
            write_text_atomic(path / CONFIG_FILE, json.dumps(self._hf_config(), indent=2) + "\n")
        return file

    def _hf_config(self) -> dict:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token,
                  "bos_token": self.bos_token, "pad_token": self.pad_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a tokenizer.json file, or a directory holding one (plus an optional tokenizer_config.json,
        read for eos/bos/pad tokens and the chat template)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"tokenizer path {path} has no {TOKENIZER_FILE}; give a tokenizer.json file or "
                            "a directory containing one")
        tokenizer = _read_tokenizer_file(file)
        config = _read_config(file.parent / CONFIG_FILE)
        eos = _special_token(config, "eos_token") or _first_present(tokenizer, COMMON_EOS_TOKENS)
        if eos is None:
            raise DataError(f"tokenizer {file} has no end-of-text token: none of {list(COMMON_EOS_TOKENS)} "
                            f"is in its vocabulary and no {CONFIG_FILE} names an eos_token")
        bos = _special_token(config, "bos_token") if config else _first_present(tokenizer, COMMON_BOS_TOKENS)
        return cls(tokenizer, eos_token=eos, bos_token=bos, pad_token=_special_token(config, "pad_token"),
                   chat_template=_chat_template(config, file.parent), name=str(file))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files `src` has (TOKENIZER_FILES) into `dst`, created if needed."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            copy_file_atomic(src / name, dst / name)


def _require_token_id(tokenizer: Tokenizer, token: str, name: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise DataError(f"tokenizer {name} has no token {token!r} in its vocabulary; its special tokens "
                        "must be tokens of the vocabulary")
    return token_id


def _first_present(tokenizer: Tokenizer, candidates: Iterable[str]) -> str | None:
    return next((t for t in candidates if tokenizer.token_to_id(t) is not None), None)


def _read_tokenizer_file(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust loader raises a bare Exception for any malformed file
        raise DataError(f"{file} is not a valid Hugging Face tokenizer.json ({e}); give a file saved by "
                        "`tokenizers` or `transformers`") from e


def _read_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file} is not valid JSON ({e}); fix or remove it") from e
    if not isinstance(config, dict):
        raise DataError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return config


def _special_token(config: dict, key: str) -> str | None:
    """A special token from tokenizer_config.json: HF stores it as a string or as {"content": ...}."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(config: dict, directory: Path) -> str | None:
    """chat_template.jinja when present, else tokenizer_config.json's entry: the file wins, as it does in
    `transformers`, so both read the same template from a directory that holds both."""
    jinja = directory / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


class WordCutter:
    """Cuts every run of non-whitespace longer than `max_chars` into `max_chars` pieces, each given to the
    BPE trainer as a text of its own, and counts what it cut (`runs`, `longest`) so the caller can say so."""

    def __init__(self, max_chars: int = MAX_TRAIN_WORD_CHARS):
        self.max_chars = max_chars
        self.runs = 0
        self.longest = 0
        self._long_run = re.compile(rf"\S{{{max_chars + 1},}}")

    def __call__(self, documents: Iterable[str]) -> Iterator[str]:
        for document in documents:
            start = 0
            for run in self._long_run.finditer(document):
                self.runs += 1
                self.longest = max(self.longest, len(run.group()))
                cuts = range(run.start() + self.max_chars, run.end(), self.max_chars)
                for cut in cuts:
                    yield document[start:cut]
                    start = cut
            if start < len(document):
                yield document[start:]

    def note(self) -> str | None:
        """One line saying what was cut, or None when nothing was."""
        if not self.runs:
            return None
        return (f"note: tokenizer training cut {self.runs} run(s) of more than {self.max_chars} characters without "
                f"whitespace (longest {self.longest:,}) into {self.max_chars}-character pieces")


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, cutter: WordCutter | None = None) -> TextTokenizer:
    """Train a byte-level BPE (GPT-2 style) whose alphabet is all 256 bytes, so any text round-trips;
    `<|endoftext|>` is id 0 and ends every document. Overlong words are cut first (`cutter`, by default
    MAX_TRAIN_WORD_CHARS), so the work stays linear in the text's length."""
    if vocab_size < _N_BYTES + 1:
        raise DataError(f"vocab_size {vocab_size} is too small; a byte-level BPE needs at least "
                        f"{_N_BYTES + 1} (256 bytes + {ENDOFTEXT})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # exact offsets, adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((cutter or WordCutter())(documents), trainer)
    return TextTokenizer(tokenizer, eos_token=ENDOFTEXT)


class IncrementalDecoder:
    """Turns a stream of token ids into a stream of text, for streaming generation.

    A byte-level token can hold part of a multi-byte UTF-8 character; decoding it alone gives U+FFFD.
    So each push decodes a short window of recent ids and returns only text beyond what was already
    returned, holding it back while it ends in U+FFFD. The window starts one emission back (not at id 0)
    so a push costs O(window), and both decodes in a push share its start, so decoders that treat the
    first token specially (SentencePiece's leading space) cancel out.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted and never decoded again
        self._read = 0  # ids before this are emitted; text of ids[prefix:read] is what was emitted last

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still incomplete)."""
        self._ids.append(token_id)
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Text still held back at the end of a stream (an incomplete character decodes as U+FFFD)."""
        emitted = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(emitted):]
