"""An OpenAI-compatible HTTP app over the continuous-batching engine (what `cybertron serve` runs).

Endpoints: /v1/completions and /v1/chat/completions (streaming as server-sent events, or not), /v1/models,
/health, and Prometheus text at /metrics. Every error is an OpenAI-style body with a 4xx/5xx status and
the server keeps serving. The engine steps in its own thread (AsyncEngine), and requests are checked and
tokenized in worker threads, so the event loop only parses, formats and streams (a huge prompt does not
stall /health or other streams); a client that disconnects has its request cancelled and its KV blocks freed.
A request body over `max_body_bytes` is refused with 413 before it is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.async_engine import AsyncEngine, EngineFailure
from cybertron.serve.chat import render_chat
from cybertron.serve.constraints import request_grammar
from cybertron.serve.engine import Engine, RequestOutput
from cybertron.serve.errors import install_error_handlers
from cybertron.serve.metrics import render_metrics
from cybertron.serve.protocol import (
    MAX_CHOICES,
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    envelope,
    error_body,
    new_id,
    plain,
    usage,
)
from cybertron.serve.sampling import InvalidParameter, SamplingParams
from cybertron.serve.structured import GrammarCompiler
from cybertron.serve.tools import ToolChatFormat, ToolUse, tool_use

# The largest request body accepted by default. A 128k-token prompt is about 1 MB as JSON token ids and
# less as text, so anything a model can take fits, several prompts of a batch included; while a hostile
# body costs at most this much memory (and the seconds of parsing it) before it is refused.
MAX_BODY_BYTES = 8 << 20


@dataclass
class Job:
    """One choice of a response: which index it has, what it continues and how it samples."""

    index: int
    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # the LoRA adapter the request's `model` named (None: the base)


@dataclass
class ServerState:
    runner: AsyncEngine
    tokenizer: TextTokenizer
    model_name: str
    counters: dict[str, int] = field(default_factory=lambda: {"http_requests": 0, "http_errors": 0})
    grammars: GrammarCompiler | None = None  # structured output: compiled grammars, cached

    @property
    def context(self) -> int:
        return self.runner.engine.config.max_seq_len

    @property
    def adapters(self) -> list[str]:
        return self.runner.engine.adapter_names

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names: None for the base (or no name); 404 for an unknown one."""
        if name is None or name == self.model_name:
            return None
        if name not in self.adapters:
            served = ", ".join(repr(n) for n in [self.model_name, *self.adapters])
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return name

    def served_name(self, jobs: list[Job]) -> str:
        """The `model` a response reports: the adapter the request chose, else the base."""
        return jobs[0].adapter or self.model_name


def create_app(engine: Engine | AsyncEngine, tokenizer: TextTokenizer, model_name: str,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app. The engine's step loop starts with the app and stops with it."""
    runner = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    state = ServerState(runner, tokenizer, model_name)
    state.grammars = GrammarCompiler(tokenizer, runner.engine.config.vocab_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="cybertron", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app, state.counters)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # Outermost: before anything reads the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, counters=state.counters)
    add_status_routes(app, state)
    add_generation_routes(app, state)
    return app


def add_status_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not state.runner.is_running:
            return JSONResponse(error_body("the engine loop is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = render_metrics(state.runner, state.counters)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "cybertron",
                "max_model_len": state.context}
        # LoRA adapters are models of their own, with the base as their parent (as vLLM lists them)
        adapters = [{**base, "id": name, "parent": state.model_name} for name in state.adapters]
        return {"object": "list", "data": [base, *adapters]}


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    # Checking and tokenizing a prompt can take seconds of CPU (the body may hold megabytes of text): it
    # runs in a worker thread, while the event loop keeps answering /health and streaming other requests.
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.counters["http_requests"] += 1
        jobs, prompt_tokens = await anyio.to_thread.run_sync(completion_jobs, state, body)
        fmt = CompletionFormat(state.tokenizer, logprobs=body.logprobs is not None)
        return await respond(state, request, jobs, fmt, body, prompt_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        state.counters["http_requests"] += 1
        jobs, prompt_tokens, tools = await anyio.to_thread.run_sync(chat_jobs, state, body)
        fmt = (ChatFormat(state.tokenizer, logprobs=body.logprobs) if tools is None
               else ToolChatFormat(state.tokenizer, body.logprobs, tools))
        return await respond(state, request, jobs, fmt, body, prompt_tokens)


def completion_jobs(state: ServerState, body: CompletionRequest) -> tuple[list[Job], int]:
    """The checked choices of a /v1/completions request, and its prompt tokens (run in a worker thread)."""
    body.check()
    adapter = state.check_model(body.model)
    if body.echo or body.suffix:
        raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
    prompts = completion_prompts(state.tokenizer, body.prompt, state.context, body.n)
    k = body.logprobs
    grammar = request_grammar(state.grammars, body.response_format, None)
    jobs = [Job(i * body.n + j, prompt, dataclasses.replace(body.sampling_params(
                _max_tokens(body.max_tokens, prompt, state.context), k is not None, k or 0, j), grammar=grammar),
                adapter)
            for i, prompt in enumerate(prompts) for j in range(body.n)]
    check_jobs(state, jobs, "prompt")
    return jobs, sum(len(p) for p in prompts)


def chat_jobs(state: ServerState, body: ChatRequest) -> tuple[list[Job], int, ToolUse | None]:
    """The checked choices of a /v1/chat/completions request, its prompt tokens, and how its replies use
    tools (None: plain text). Runs in a worker thread."""
    body.check()
    adapter = state.check_model(body.model)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    functions = [t.function.model_dump(exclude_none=True) for t in body.tools or ()]
    tools = tool_use(state.tokenizer, functions, plain(body.tool_choice), body.parallel_tool_calls)
    messages = [m.template_message(i) for i, m in enumerate(body.messages)]
    text = render_chat(state.tokenizer, messages, [t.model_dump(exclude_none=True) for t in body.tools or ()]
                       or None)
    prompt = encode_prompt(state.tokenizer, text, state.context, "messages")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    grammar = request_grammar(state.grammars, body.response_format, tools)
    jobs = [Job(j, prompt, dataclasses.replace(body.sampling_params(
                _max_tokens(max_tokens, prompt, state.context), body.logprobs, body.top_logprobs or 0, j),
                grammar=grammar), adapter)
            for j in range(body.n)]
    check_jobs(state, jobs, "messages")
    return jobs, len(prompt), tools


def check_jobs(state: ServerState, jobs: list[Job], prompt_param: str) -> None:
    """Validate every choice, so that errors get a proper status before any stream starts."""
    for job in jobs:
        try:
            state.runner.check_request(job.prompt, job.params)
        except InvalidParameter as err:
            if err.param == "prompt":  # name the field the client sent (chat has messages, not a prompt)
                err.param = prompt_param
            raise


def completion_prompts(tokenizer: TextTokenizer, prompt: str | list, context: int,
                       n: int = 1) -> list[list[int]]:
    """/v1/completions accepts a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
    if len(prompt) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompt)} prompts x n={n} asks for {len(prompt) * n} choices; at most "
                       f"{MAX_CHOICES} per request", param="n" if n > 1 else "prompt")
    # Encoded as the model's tokenizer would for a plain text (its own bos, if it adds one).
    return [encode_prompt(tokenizer, p, context, "prompt", add_special_tokens=True) if isinstance(p, str)
            else list(p) for p in prompt]


def encode_prompt(tokenizer: TextTokenizer, text: str, context: int, param: str,
                  add_special_tokens: bool = False) -> list[int]:
    """The token ids of `text`, in a way that bounds the work a text far beyond the context costs.

    Encoding takes seconds and hundreds of MB per MB of text, all wasted on a prompt that cannot fit. So a
    long text is first probed by prefixes (4x longer each time, so a text that fits costs at most a third
    more): one whose prefix already has more than twice the context in tokens is refused. The margin of 2
    covers any difference between a prefix's tokens and the start of the whole text's, which comes only
    from tokens across the cut. encode_batch releases the GIL, so the event loop runs meanwhile."""
    size = 4 * context  # characters: a first guess at what a context's worth of tokens takes
    while size < len(text):
        probe = len(tokenizer.encode_batch([text[:size]], add_special_tokens)[0])
        if probe > 2 * context:
            raise InvalidParameter(param, f"the prompt's first {size} characters alone are {probe} tokens, "
                                   f"but the model's context is {context}; shorten it",
                                   code="context_length_exceeded")
        size *= 4
    return tokenizer.encode_batch([text], add_special_tokens)[0]


def _max_tokens(asked: int | None, prompt: Sequence[int], context: int) -> int:
    """The client's max_tokens, or by default whatever room the context leaves."""
    return asked if asked is not None else max(1, context - len(prompt))


async def respond(state: ServerState, request: Request, jobs: list[Job], fmt: CompletionFormat,
                  body: CompletionRequest | ChatRequest, prompt_tokens: int) -> Response:
    """Stream the choices, or collect them into one response."""
    response_id = new_id(fmt.id_prefix)
    if body.stream:
        events = sse_events(state, jobs, fmt, response_id, prompt_tokens, body.include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await collect(state, request, jobs)
    if results is None:
        return Response(status_code=499)  # the client left; nobody reads this
    choices = [fmt.choice(job.index, results[job.index]) for job in jobs]
    completion_tokens = sum(len(o.token_ids) for outs in results.values() for o in outs)
    return JSONResponse(envelope(fmt.kind, response_id, state.served_name(jobs), choices,
                                 usage=usage(prompt_tokens, completion_tokens)))


async def merge(runner: AsyncEngine, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all jobs as they come, tagged with the job's choice index. Closing it cancels them all."""
    if len(jobs) == 1:
        async with aclosing(runner.stream(jobs[0].prompt, jobs[0].params, jobs[0].adapter)) as outputs:
            async for output in outputs:
                yield jobs[0].index, output
        return
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async with aclosing(runner.stream(job.prompt, job.params, job.adapter)) as outputs:
                async for output in outputs:
                    inbox.put_nowait((job.index, output))
        except Exception as err:
            inbox.put_nowait((job.index, err))
        inbox.put_nowait((job.index, None))

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def collect(state: ServerState, request: Request, jobs: list[Job]) -> dict[int, list] | None:
    """All outputs per choice index; None if the client disconnected first (its requests are cancelled)."""
    results: dict[int, list[RequestOutput]] = {job.index: [] for job in jobs}

    async def gather() -> None:
        async with aclosing(merge(state.runner, jobs)) as outputs:
            async for index, output in outputs:
                results[index].append(output)

    work, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
    if work not in done:
        return None
    work.result()  # re-raises EngineFailure -> 500
    return results


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only a disconnect arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse_events(state: ServerState, jobs: list[Job], fmt: CompletionFormat, response_id: str,
                     prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    def event(choices: list[dict], **extra) -> str:
        chunk = envelope(fmt.chunk_kind, response_id, state.served_name(jobs), choices, **extra)
        return f"data: {json.dumps(chunk)}\n\n"

    completion_tokens = 0
    try:
        for job in jobs:
            opening = fmt.opening(job.index)
            if opening is not None:
                yield event([opening])
        async with aclosing(merge(state.runner, jobs)) as outputs:
            async for index, output in outputs:
                completion_tokens += len(output.token_ids)
                if output.text or output.finished or fmt.logprobs:
                    chunk = fmt.chunk(index, output)
                    if chunk is not None:  # None: text held back (a tool call may be starting)
                        yield event([chunk])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except EngineFailure as err:
        state.counters["http_errors"] += 1
        yield f"data: {json.dumps(error_body(str(err), 'server_error', code=err.code))}\n\n"
    yield "data: [DONE]\n\n"


class APIKeyMiddleware:
    """401 for /v1/ requests without `Authorization: Bearer <key>` (checked before the body is parsed)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                body = error_body("invalid or missing API key; send `Authorization: Bearer <key>`",
                                  param=None, code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    """Raised while reading a body that passed the limit (FastAPI lets an HTTPException from the body
    reader through to the error handlers)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                              "(server.max_body_bytes)")


class BodyLimitMiddleware:
    """413 for a request body over `max_bytes`: a declared Content-Length is checked before any byte is
    read, and a body sent without one (chunked) is cut off as soon as it passes the limit, so at most the
    limit is ever held in memory."""

    def __init__(self, app, max_bytes: int, counters: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.counters = counters if counters is not None else {"http_errors": 0}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            err = BodyTooLarge(self.max_bytes)
            body = error_body(err.detail, param=None, code="request_too_large")
            self.counters["http_errors"] += 1
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        seen = 0

        async def receive_within_limit():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)
