"""OpenAI API shapes: request bodies (validated by pydantic), error bodies, and response/chunk builders.

A field this server does not implement (best_of, min_p, audio...) is refused with a 400 naming it, never
silently dropped, unless it holds its neutral value (null, false, 0, [], {}, or e.g. modalities ["text"]),
which asks for nothing; clients and SDKs send those routinely. response_format, tools and tool_choice are
implemented (structured.py, tools.py), and their combinations the server cannot honour get a 400 too. `user` is mere
metadata and is accepted. Text must be valid Unicode: JSON lets a lone surrogate ("\\ud800") through,
and it is refused here rather than failing in the tokenizer.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.engine import RequestOutput
from cybertron.serve.sampling import MAX_TOP_LOGPROBS, InvalidParameter, SamplingParams


class APIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


MAX_N = 16  # choices per prompt
MAX_CHOICES = 128  # choices per request (prompts x n): each is a request in the engine
# Fields we do not implement, with the values that ask for nothing beyond NEUTRAL (null, false, 0, [], {}).
NEUTRAL = (None, False, 0, [], {})
ALSO_NEUTRAL: dict[str, tuple] = {
    "tool_choice": ("none", "auto"),  # on /v1/completions, which has no tools ("auto" without tools calls none)
    "parallel_tool_calls": (True,),
    "modalities": (["text"],),
    "best_of": (1,),
    "service_tier": ("auto", "default"),
    "repetition_penalty": (1, 1.0),
}


def reject_unsupported(extra: dict[str, Any] | None, where: str = "") -> None:
    """InvalidParameter naming the first field we do not implement that asks for something."""
    for name, value in (extra or {}).items():
        if value not in (*NEUTRAL, *ALSO_NEUTRAL.get(name, ())):
            raise InvalidParameter(where + name, f"{where + name} is not supported by this server; leave it "
                                   "out", code="unsupported_parameter")


def check_text(value: Any, param: str) -> None:
    """InvalidParameter if a string in `value` (a string, or lists/dicts of them) is not valid Unicode."""
    if isinstance(value, str):
        if value.isascii():
            return
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidParameter(param, f"{param} is not valid Unicode text: a lone surrogate "
                                   f"({value[err.start]!r}) at character {err.start}") from None
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, int):  # token ids: nothing to check, and there can be a million
                check_text(item, param)
    elif isinstance(value, dict):
        for item in value.values():
            check_text(item, param)


def plain(value: Any) -> Any:
    """Pydantic models (also in lists) as dicts and lists, for check_text."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True)
    return [plain(item) for item in value] if isinstance(value, list) else value


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced exactly


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments always follow the parameters schema where generation is constrained


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")  # kept to be refused by name in check(), not dropped

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM's extension (0 or -1 = off)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # OpenAI and vLLM take an int64 seed; choice i of a request samples with seed + i.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    user: str | None = None  # metadata about the caller: accepted, unused
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, JSON keys being strings) -> bias
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None  # text, or JSON (any object, or following a schema)

    def check(self) -> None:
        """InvalidParameter for a field we do not implement or text that is not valid Unicode."""
        reject_unsupported(self.model_extra)
        for name in type(self).model_fields:
            if name != "messages":  # checked message by message, to name the one at fault
                check_text(plain(getattr(self, name)), name)

    def sampling_params(self, max_tokens: int, logprobs: bool, top_logprobs: int,
                        choice: int) -> SamplingParams:
        if self.top_k is not None and self.top_k < -1:
            raise InvalidParameter("top_k", f"top_k must be -1 or 0 (off) or at least 1, got {self.top_k}")
        # JSON has already decoded escapes ("\\n" arrives as a newline): decode_escapes is for command lines
        # only, and here it would turn a literal backslash the client sent into something else.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        # Choices of one request differ from each other yet stay reproducible: seed + choice index.
        seed = self.seed + choice if self.seed is not None else None
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=max_tokens,
                              stop=stop, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs,
                              ignore_eos=self.ignore_eos, logit_bias=self._logit_bias(),
                              presence_penalty=self.presence_penalty or 0.0,
                              frequency_penalty=self.frequency_penalty or 0.0)

    def _logit_bias(self) -> tuple[tuple[int, float], ...]:
        """The keys as token ids; InvalidParameter for a key that is not one (ranges: SamplingParams)."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdecimal()) or len(key) > 20:
                raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids (decimal strings such "
                                                     f"as \"50256\"), got {key[:40]!r}")
            pairs.append((int(key), bias))
        return tuple(pairs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: which call it answers

    def text(self) -> str:
        """The content as text; content parts other than text are refused (this is a text model)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise InvalidParameter("messages", "only text content parts are supported by this model")
        return "".join(str(part.get("text", "")) for part in self.content)

    def template_message(self, index: int) -> dict[str, Any]:
        """The message as chat templates take it (transformers' shape): tool-call arguments as objects."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls and self.role != "assistant":
            raise InvalidParameter(f"messages.{index}.tool_calls", "only assistant messages hold tool_calls")
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": call.type, "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments,
                                                                    f"messages.{index}.tool_calls.{j}")}}
                for j, call in enumerate(self.tool_calls)]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _arguments(text: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise InvalidParameter(param + ".function.arguments", f"{param}.function.arguments must be a JSON "
                               f"object as a string, got {text[:40]!r}")
    return value


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def check(self) -> None:
        super().check()
        for i, message in enumerate(self.messages):
            reject_unsupported(message.model_extra, f"messages.{i}.")
            check_text(message.content, f"messages.{i}.content")
            check_text(plain(message.tool_calls), f"messages.{i}.tool_calls")


# ---- responses ------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, response_id: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": response_id, "object": kind, "created": int(time.time()), "model": model,
            "system_fingerprint": None, "choices": choices, **extra}


def completion_logprobs(tokenizer: TextTokenizer, output: RequestOutput | list[RequestOutput],
                        offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    outputs = output if isinstance(output, list) else [output]
    tokens, values, tops, offsets = [], [], [], []
    for out in outputs:
        for i, (token, value) in enumerate(zip(out.token_ids, out.logprobs)):
            piece = tokenizer.decode([token])
            tokens.append(piece)
            values.append(value)
            offsets.append(offset)
            offset += len(piece)
            if out.top_logprobs:
                tops.append({tokenizer.decode([t]): lp for t, lp in out.top_logprobs[i]})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops or None, "text_offset": offsets}


def chat_logprobs(tokenizer: TextTokenizer, output: RequestOutput | list[RequestOutput]) -> dict[str, Any]:
    """The chat format: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}."""
    outputs = output if isinstance(output, list) else [output]
    content = []
    for out in outputs:
        for i, (token, value) in enumerate(zip(out.token_ids, out.logprobs)):
            top = out.top_logprobs[i] if out.top_logprobs else []
            content.append({**_token_entry(tokenizer, token, value),
                            "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in top]})
    return {"content": content}


def _token_entry(tokenizer: TextTokenizer, token: int, logprob: float) -> dict[str, Any]:
    piece = tokenizer.decode([token])
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


class CompletionFormat:
    """Choices of /v1/completions: {"index", "text", "logprobs", "finish_reason"}."""

    kind, chunk_kind, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, tokenizer: TextTokenizer, logprobs: bool):
        self.tokenizer, self.logprobs = tokenizer, logprobs

    def opening(self, index: int) -> dict[str, Any] | None:
        return None  # completions start with the first piece of text

    def chunk(self, index: int, out: RequestOutput) -> dict[str, Any]:
        logprobs = completion_logprobs(self.tokenizer, out) if self.logprobs else None
        return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}

    def choice(self, index: int, outs: list[RequestOutput]) -> dict[str, Any]:
        logprobs = completion_logprobs(self.tokenizer, outs) if self.logprobs else None
        return {"index": index, "text": "".join(o.text for o in outs), "logprobs": logprobs,
                "finish_reason": outs[-1].finish_reason}


class ChatFormat(CompletionFormat):
    """Choices of /v1/chat/completions: a message (or a delta when streaming) from the assistant."""

    kind, chunk_kind, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def chunk(self, index: int, out: RequestOutput) -> dict[str, Any]:
        delta = {"content": out.text} if out.text else {}
        logprobs = chat_logprobs(self.tokenizer, out) if self.logprobs else None
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": out.finish_reason}

    def choice(self, index: int, outs: list[RequestOutput]) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(o.text for o in outs)}
        logprobs = chat_logprobs(self.tokenizer, outs) if self.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs,
                "finish_reason": outs[-1].finish_reason}
