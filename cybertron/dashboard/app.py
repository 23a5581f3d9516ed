"""The dashboard's HTTP app: the page, the runs and their metrics as JSON, and the chat relay.

    GET  /                                   the page (static/index.html: one file, no build step)
    GET  /api/runs                           every run's summary (folder.py), most recently updated first
    GET  /api/runs/{name}/metrics?cursor=C   metrics.jsonl records written since cursor C (tail.py)
    GET  /api/models                         the served models (relayed from --serve-url's /v1/models)
    POST /api/chat                           a chat completion (relayed to --serve-url's /v1/chat/completions)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from cybertron.dashboard.folder import BadRunName, RunNotFound, RunsFolder
from cybertron.dashboard.proxy import MAX_CHAT_BODY_BYTES, ServeProxy
from cybertron.dashboard.tail import METRICS_FILE, read_new

PAGE = Path(__file__).with_name("static") / "index.html"


def create_app(folder: RunsFolder, proxy: ServeProxy) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await proxy.close()

    app = FastAPI(title="cybertron dashboard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text()  # read once: the page is part of the package

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"runs_dir": str(folder.root), "serve_url": proxy.serve_url}

    @app.get("/api/runs")
    def runs() -> list[dict[str, Any]]:
        return [s.to_dict() for s in folder.summaries()]

    @app.get("/api/runs/{name}/metrics")
    def metrics(name: str, cursor: str = "") -> dict[str, Any]:
        tail = read_new(find(folder, name) / METRICS_FILE, cursor)
        return {"records": tail.records, "cursor": tail.cursor, "reset": tail.reset, "more": tail.more}

    @app.get("/api/models")
    async def models() -> Response:
        return await proxy.get("/v1/models")

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_CHAT_BODY_BYTES:
            return JSONResponse({"error": {"message": f"request body over {MAX_CHAT_BODY_BYTES} bytes"}}, 413)
        return await proxy.post_streaming("/v1/chat/completions", body)

    return app


def find(folder: RunsFolder, name: str) -> Path:
    """The run's directory; 400 for a name that is a path (`..`, `a/b`), 404 for one not in the folder."""
    try:
        return folder.find(name)
    except BadRunName as err:
        raise HTTPException(400, str(err)) from err
    except RunNotFound as err:
        raise HTTPException(404, str(err)) from err
