"""Relaying the chat playground's requests to a running `cybertron serve`.

The page talks to the dashboard's own origin only and the dashboard forwards to --serve-url, rather than the
browser calling the server with CORS: the server then needs no CORS setting (it has none, and allowing any origin
would let every page the user opens call it), its API key stays on the dashboard's side instead of in the
browser, and a server reachable only from the dashboard's machine (127.0.0.1 on a training node, an SSH tunnel to
the dashboard alone) still works. Streamed replies (server-sent events) are relayed chunk by chunk as they come.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

MAX_CHAT_BODY_BYTES = 1 << 20  # a playground conversation; the server enforces its own limit as well
CONNECT_TIMEOUT_S = 5.0


class ServeProxy:
    """Forwards to `serve_url` (e.g. http://127.0.0.1:8000), adding `Authorization: Bearer api_key` if given."""

    def __init__(self, serve_url: str, api_key: str = ""):
        self.serve_url = serve_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a long generation streams for as long as it takes.
        self.client = httpx.AsyncClient(base_url=self.serve_url, headers=headers,
                                        timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S))

    async def close(self) -> None:
        await self.client.aclose()

    async def get(self, path: str) -> Response:
        try:
            upstream = await self.client.get(path)
        except httpx.HTTPError as err:
            return self.unreachable(err)
        return Response(upstream.content, upstream.status_code,
                        media_type=upstream.headers.get("content-type", "application/json"))

    async def post_streaming(self, path: str, body: bytes) -> Response:
        """POST `body` (JSON) upstream; the reply is relayed as it arrives (streamed or not)."""
        request = self.client.build_request("POST", path, content=body, headers={"Content-Type": "application/json"})
        try:
            upstream = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            return self.unreachable(err)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:  # the page went away (or the reply ended): close upstream so the server stops generating
                await upstream.aclose()

        return StreamingResponse(relay(), upstream.status_code,
                                 media_type=upstream.headers.get("content-type", "application/json"))

    def unreachable(self, err: Exception) -> JSONResponse:
        message = f"cannot reach cybertron serve at {self.serve_url} ({type(err).__name__}: {err}); start " \
                  "`cybertron serve --model RUN_DIR` there or pass --serve-url"
        return JSONResponse({"error": {"message": message, "type": "bad_gateway"}}, status_code=502)
