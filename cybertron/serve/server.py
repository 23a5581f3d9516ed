"""An OpenAI-compatible HTTP app over the continuous-batching engine (what `cybertron serve` runs).

Endpoints: /v1/completions and /v1/chat/completions (streaming as server-sent events, or not), /v1/models,
/health, and Prometheus text at /metrics. Every error is an OpenAI-style body with a 4xx/5xx status and
the server keeps serving. The engine steps in its own thread (AsyncEngine), so the event loop only parses,
formats and streams; a client that disconnects has its request cancelled and its KV blocks freed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.async_engine import AsyncEngine, EngineFailure
from cybertron.serve.chat import render_chat
from cybertron.serve.engine import Engine, RequestOutput
from cybertron.serve.errors import install_error_handlers
from cybertron.serve.metrics import render_metrics
from cybertron.serve.protocol import (
    APIError,
    ChatFormat,
    ChatRequest,
    CompletionFormat,
    CompletionRequest,
    envelope,
    error_body,
    new_id,
    usage,
)
from cybertron.serve.sampling import InvalidParameter, SamplingParams


@dataclass
class Job:
    """One choice of a response: which index it has, what it continues and how it samples."""

    index: int
    prompt: list[int]
    params: SamplingParams


@dataclass
class ServerState:
    runner: AsyncEngine
    tokenizer: TextTokenizer
    model_name: str
    counters: dict[str, int] = field(default_factory=lambda: {"http_requests": 0, "http_errors": 0})

    @property
    def context(self) -> int:
        return self.runner.engine.config.max_seq_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def create_app(engine: Engine | AsyncEngine, tokenizer: TextTokenizer, model_name: str,
               api_key: str | None = None) -> FastAPI:
    """The ASGI app. The engine's step loop starts with the app and stops with it."""
    runner = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    state = ServerState(runner, tokenizer, model_name)

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
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "cybertron", "max_model_len": state.context}]}


def add_generation_routes(app: FastAPI, state: ServerState) -> None:
    tokenizer = state.tokenizer

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.counters["http_requests"] += 1
        state.check_model(body.model)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = completion_prompts(tokenizer, body.prompt)
        k = body.logprobs
        jobs = [Job(i * body.n + j, prompt, body.sampling_params(
                    _max_tokens(body.max_tokens, prompt, state.context), k is not None, k or 0, j))
                for i, prompt in enumerate(prompts) for j in range(body.n)]
        fmt = CompletionFormat(tokenizer, logprobs=k is not None)
        return await respond(state, request, jobs, fmt, body, sum(len(p) for p in prompts))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        state.counters["http_requests"] += 1
        state.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = tokenizer.encode(render_chat(tokenizer, messages))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        jobs = [Job(j, prompt, body.sampling_params(_max_tokens(max_tokens, prompt, state.context),
                                                    body.logprobs, body.top_logprobs or 0, j))
                for j in range(body.n)]
        fmt = ChatFormat(tokenizer, logprobs=body.logprobs)
        return await respond(state, request, jobs, fmt, body, len(prompt), prompt_param="messages")


def completion_prompts(tokenizer: TextTokenizer, prompt: str | list) -> list[list[int]]:
    """/v1/completions accepts a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
    # Encoded as the model's tokenizer would for a plain text (its own bos, if it adds one).
    return [tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompt]


def _max_tokens(asked: int | None, prompt: Sequence[int], context: int) -> int:
    """The client's max_tokens, or by default whatever room the context leaves."""
    return asked if asked is not None else max(1, context - len(prompt))


async def respond(state: ServerState, request: Request, jobs: list[Job], fmt: CompletionFormat,
                  body: CompletionRequest | ChatRequest, prompt_tokens: int,
                  prompt_param: str = "prompt") -> Response:
    """Validate every choice (so errors get a proper status before any stream starts), then stream or
    collect them."""
    for job in jobs:
        try:
            state.runner.check_request(job.prompt, job.params)
        except InvalidParameter as err:
            if err.param == "prompt":  # name the field the client sent (chat has messages, not a prompt)
                err.param = prompt_param
            raise
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
    return JSONResponse(envelope(fmt.kind, response_id, state.model_name, choices,
                                 usage=usage(prompt_tokens, completion_tokens)))


async def merge(runner: AsyncEngine, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all jobs as they come, tagged with the job's choice index. Closing it cancels them all."""
    if len(jobs) == 1:
        async with aclosing(runner.stream(jobs[0].prompt, jobs[0].params)) as outputs:
            async for output in outputs:
                yield jobs[0].index, output
        return
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async with aclosing(runner.stream(job.prompt, job.params)) as outputs:
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
        chunk = envelope(fmt.chunk_kind, response_id, state.model_name, choices, **extra)
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
                    yield event([fmt.chunk(index, output)])
        if include_usage:
            yield event([], usage=usage(prompt_tokens, completion_tokens))
    except EngineFailure as err:
        state.counters["http_errors"] += 1
        yield f"data: {json.dumps(error_body(str(err), 'server_error'))}\n\n"
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
