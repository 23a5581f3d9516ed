"""OpenAI API shapes: request bodies (validated by pydantic), error bodies, and response/chunk builders.

Unknown request fields are ignored (clients send many optional ones); fields we cannot honour with a
non-default value (penalties, echo, suffix) are rejected rather than silently ignored.
"""

from __future__ import annotations

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


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM's extension (0 or -1 = off)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None

    def sampling_params(self, max_tokens: int, logprobs: bool, top_logprobs: int,
                        choice: int) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidParameter(name, f"{name} is not supported; leave it at 0")
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
                              ignore_eos=self.ignore_eos)

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
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The content as text; content parts other than text are refused (this is a text model)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise InvalidParameter("messages", "only text content parts are supported by this model")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


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
