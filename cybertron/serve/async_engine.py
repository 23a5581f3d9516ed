"""The engine's step loop in a background thread, feeding asyncio consumers (the HTTP server).

Only the loop thread touches the Engine: other threads send it commands through a queue (add, cancel)
and get outputs back through `loop.call_soon_threadsafe`, batched once per step per event loop. The event
loop therefore never waits for a model forward, and the engine needs no locks.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cybertron.serve.engine import Engine, RequestOutput
from cybertron.serve.sampling import SamplingParams

IDLE_WAIT_S = 1.0  # how long the idle loop sleeps before re-checking that it should still run


class EngineFailure(RuntimeError):
    """This request failed in the engine (the step loop raised while it was in flight, or the model gave it
    non-finite logits); the engine keeps serving the others. `code` is for the HTTP error body."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Handle:
    """One request as the asyncio side sees it: where its outputs go, and its engine id once added."""

    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base)
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None
    done: bool = False


class AsyncEngine:
    """`async for output in async_engine.stream(prompt_ids, params)`; leaving the loop early (client gone,
    task cancelled) cancels the request and frees its KV blocks."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._active: dict[int, _Handle] = {}
        self._thread: threading.Thread | None = None
        self.failures = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cybertron-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises the engine's InvalidParameter in the caller, before anything is queued."""
        self.engine.check_request(prompt_ids, params)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        self.check_request(prompt_ids, params)
        self.engine.adapter_slot(adapter)  # an unknown adapter is refused here, before anything is queued
        handle = _Handle(list(prompt_ids), params, asyncio.get_running_loop(), adapter)
        self._send("add", handle)
        try:
            while True:
                output = await handle.outputs.get()
                if isinstance(output, BaseException):
                    raise output
                if output.error is not None:
                    handle.done = True  # the engine already ended it
                    raise EngineFailure(output.error, code="non_finite_logits")
                yield output
                if output.finished:
                    handle.done = True
                    return
        finally:
            if not handle.done:
                self._send("cancel", handle)

    def _send(self, command: str, handle: _Handle) -> None:
        self._commands.put((command, handle))
        self._wake.set()

    # ---- the loop thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(IDLE_WAIT_S)
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a bug or out-of-memory: fail what is in flight, keep serving
                self._fail_all(err)
                continue
            self._deliver(outputs)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, handle = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                try:
                    handle.request_id = self.engine.add_request(handle.prompt, handle.params,
                                                                adapter=handle.adapter)
                except Exception as err:  # validated already; anything left is delivered, not lost
                    self._post(handle.loop, [(handle, err)])
                    continue
                self._active[handle.request_id] = handle
            elif handle.request_id is not None and self._active.pop(handle.request_id, None) is not None:
                self.engine.cancel(handle.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            handle = self._active.get(output.request_id)
            if handle is None:
                continue
            if output.finished:
                del self._active[output.request_id]
            by_loop.setdefault(handle.loop, []).append((handle, output))
        for loop, items in by_loop.items():
            self._post(loop, items)

    def _fail_all(self, err: Exception) -> None:
        traceback.print_exception(err, file=sys.stderr)
        self.failures += 1
        failed = list(self._active.values())
        self._active.clear()
        for handle in failed:
            self.engine.cancel(handle.request_id)
            self._post(handle.loop, [(handle, EngineFailure(f"generation failed: {err}"))])

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
        def put_all() -> None:
            for handle, item in items:
                handle.outputs.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            pass  # the consumer's event loop is closed: nobody is left to read these outputs
