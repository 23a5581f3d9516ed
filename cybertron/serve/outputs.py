"""What the engine hands back for a request each step: its own module, so the engine and the speculative
decoding it calls (serve/verify.py) both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed to its consumer)."""

    request_id: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    text: str  # new text that is safe to show (stop strings already cut)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # why the request failed (finish_reason "error"); the others are unaffected
