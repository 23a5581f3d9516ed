"""Structured output: generation constrained by a grammar (a JSON schema, any JSON object, a tool call), so
that what a request returns parses, whatever the model's weights.

The grammar library is llguidance (guidance-ai), the optional extra `cybertron[structured]`. Chosen over
xgrammar and outlines-core, which also ship CPU wheels for this Python:
- its wheel is one abi3 binary without Python dependencies; xgrammar's requires torch, transformers,
  apache-tvm-ffi and triton (hundreds of MB, of no use on a CPU box);
- it computes each step's mask from the parser state (an Earley parser over a lazily built lexer, walked
  along a token trie), so a new schema needs no work over the vocabulary before its first token;
  outlines-core first builds an index over the whole vocabulary for each schema and, compiling to a
  regular expression, unrolls recursive JSON (such as {"type": "json_object"}) to a fixed depth;
- it reads Lark with embedded JSON schemas (%json), which a tool call needs: the chat template's literal
  text around an arguments object (tools.py).
The measured costs (compiling, the mask per token, tokens/s constrained vs free) are in bench/RESULTS.md
("Serving v2: structured output"). The bridge to our tokenizer is built at the first request that needs
it, in a worker thread; it walks the whole vocabulary once per server.

Flow. The server compiles a request's grammar once (GrammarCompiler: an LRU cache keyed by the grammar's
text, so a schema used by many requests compiles once) into a `Grammar` carried by SamplingParams. The
engine gives each request its own Matcher (a copy of the compiled parser), and at every step:
  1. token_mask(): one bitmask row per constrained row of the batch (the others get none), computed on the
     host while the device runs the forward;
  2. sample() sets the logits of tokens the grammar forbids to -inf after logit_bias and penalties, before
     temperature, top-k and top-p (greedy rows included); the reported log-probs stay the model's;
  3. Matcher.advance() consumes the sampled token; a grammar that admits nothing more ends the request
     with finish_reason "stop" (where it may end but could go on, the end-of-text token is allowed).

Whitespace: JSON is generated without free whitespace, with the separators ", " and ": " of Python's
json.dumps (what chat templates render tool calls with). A grammar that allowed any run of spaces and
newlines between tokens would let a model spend its whole budget there.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.sampling import InvalidParameter, TokenMask

EXTRA = "structured"  # pyproject's optional extra that installs the grammar library
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled grammars kept per server


def require_library(param: str) -> Any:
    """The llguidance module; InvalidParameter (a 400 naming `param` and the extra) where it is not installed."""
    try:
        import llguidance
    except ImportError:
        raise InvalidParameter(param, f"{param} needs constrained decoding, which this server lacks: install "
                               f"the optional extra with `pip install 'cybertron[{EXTRA}]'` (llguidance)",
                               code="missing_extra") from None
    return llguidance


def has_library() -> bool:
    try:
        require_library("")
    except InvalidParameter:
        return False
    return True


def json_options(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with our whitespace settings as defaults (a schema's own x-guidance options win)."""
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher
        self.error: str | None = None

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row`, a contiguous int32 CPU tensor of ceil(vocab / 32) words."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> str | None:
        """Consume the sampled token: None to go on, "stop" when the grammar admits nothing more, "error"
        when the library failed (a parser limit; the token was allowed, so not a wrong token), with
        `self.error` saying why."""
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            self.error = f"constrained decoding failed: {self._matcher.get_error().splitlines()[0]}"
            return "error"
        return "stop" if self._matcher.is_stopped() else None


@dataclass(frozen=True, eq=False)
class Grammar:
    """A grammar compiled for one tokenizer; each request takes its own `matcher()`."""

    text: str
    vocab_size: int
    _compiled: Any

    def matcher(self) -> Matcher:
        return Matcher(self._compiled.deep_copy())


def token_mask(matchers: Sequence[Matcher | None], vocab_size: int,
               device: torch.device | str) -> TokenMask | None:
    """The allowed tokens of every row with a matcher, None if no row has one. The bitmask is built on the
    host (where the library writes it) and sent to the device without waiting."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    bits = torch.empty(len(rows), (vocab_size + 31) // 32, dtype=torch.int32,
                       pin_memory=torch.device(device).type == "cuda")
    for k, i in enumerate(rows):
        matchers[i].fill(bits[k])
    index = torch.tensor(rows, dtype=torch.int64)
    return TokenMask(index.to(device, non_blocking=True), bits.to(device, non_blocking=True))


class GrammarCompiler:
    """Compiles grammars against one tokenizer and keeps the last CACHE_SIZE, so that a schema many requests
    share compiles once. Thread-safe: the server compiles in its worker threads."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's (its output may be wider than the tokenizer's vocabulary)
        self.cache_size = cache_size
        self._library_tokenizer: Any = None  # built on first use, so a server without the extra still starts
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def json_schema(self, schema: dict[str, Any], param: str) -> Grammar:
        """Any JSON value valid under `schema` (InvalidParameter naming `param` if it cannot be compiled)."""
        lib = require_library(param)
        try:
            text = lib.LLMatcher.grammar_from_json_schema(json_options(schema))
        except ValueError as err:
            raise InvalidParameter(param, f"{param} is not a usable JSON schema: {err}") from None
        return self.compile(text, param)

    def json_object(self, param: str) -> Grammar:
        """Any JSON object (response_format {"type": "json_object"})."""
        return self.json_schema({"type": "object"}, param)

    def lark(self, grammar: str, param: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (%json {...} embeds a JSON schema)."""
        return self.compile(require_library(param).LLMatcher.grammar_from_lark(grammar), param)

    def compile(self, text: str, param: str) -> Grammar:
        """The compiled grammar for llguidance grammar `text`, from the cache when it is there."""
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        lib = require_library(param)
        tokenizer = self._tokenizer(lib, param)
        # validate_grammar reports an unsupported schema feature by name; the constructor only flags an error.
        failed, messages = lib.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        compiled = None if failed else lib.LLMatcher(tokenizer, text, log_level=0)
        if failed or compiled.is_error():
            message = (messages[0] if failed else compiled.get_error()).splitlines()[0]
            raise InvalidParameter(param, f"{param} cannot be used for constrained decoding: {message}")
        grammar = Grammar(text, self.vocab_size, compiled)
        with self._lock:
            self._cache[text] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _tokenizer(self, lib: Any, param: str) -> Any:
        """The library's view of our tokenizer: built from the tokenizer.json the HF tokenizers library
        serializes (vocabulary, merges, byte-level or byte-fallback decoding), widened to the model's output
        size; its end-of-text token is the one the engine stops at."""
        with self._lock:
            if self._library_tokenizer is None:
                try:
                    self._library_tokenizer = lib.LLTokenizer(self.tokenizer.backend.to_str(),
                                                              n_vocab=self.vocab_size,
                                                              eos_token=self.tokenizer.eos_id)
                except (ValueError, RuntimeError) as err:  # a tokenizer kind the library cannot walk
                    raise InvalidParameter(param, f"{param} needs constrained decoding, which this model's "
                                           f"tokenizer does not support: {err}") from None
            return self._library_tokenizer


def schema_text(schema: dict[str, Any]) -> str:
    """`schema` as embedded in a Lark grammar (%json {...}), with our whitespace settings."""
    return json.dumps(json_options(schema), ensure_ascii=False)
