"""Every HTTP error is an OpenAI-style body: {"error": {"message", "type", "param", "code"}}.

FastAPI's own shapes ({"detail": ...}, status 422) are replaced, so clients written for OpenAI's API can
read every failure the same way."""

from __future__ import annotations

import sys
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from cybertron.errors import UserError
from cybertron.serve.async_engine import EngineFailure
from cybertron.serve.protocol import APIError, error_body
from cybertron.serve.sampling import InvalidParameter


def install_error_handlers(app: FastAPI, counters: dict[str, int]) -> None:
    def answer(status: int, body: dict) -> JSONResponse:
        counters["http_errors"] += 1
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return answer(err.status, err.body())

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        param = err.param if isinstance(err, InvalidParameter) else None
        code = err.code if isinstance(err, InvalidParameter) else None
        return answer(400, error_body(str(err), param=param, code=code))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return answer(400, validation_error_body(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if err.status_code == 413 else None
        return answer(err.status_code, error_body(str(err.detail), kind, code=code))

    @app.exception_handler(EngineFailure)
    async def engine_failure(request: Request, err: EngineFailure) -> JSONResponse:
        return answer(500, error_body(str(err), "server_error", code=err.code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        traceback.print_exception(err, file=sys.stderr)
        return answer(500, error_body(f"internal error: {type(err).__name__}", "server_error"))


def validation_error_body(err: RequestValidationError) -> dict:
    """One sentence naming the first bad field (or saying the body is not JSON)."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_body(f"the request body is not valid JSON ({detail})", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union types report one error per member; the field name is what a client needs.
    loc = [part for part in loc if not any(c in part for c in "[]()")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        return error_body(f"missing required field {param!r}", param=param)
    if param is None:
        return error_body(f"the request body must be a JSON object with the documented fields: {message}")
    return error_body(f"invalid value for {param!r}: {message}", param=param)
