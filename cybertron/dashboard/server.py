"""Listening: bind the socket first (a taken port or unknown host is one clear error before anything starts, and
port 0 picks a free port whose number is then known), then hand it to uvicorn. `in_thread` runs an app on such a
socket in a background thread, for tests and bench/dashboard_screenshot.py."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from cybertron.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; UserError if that is impossible."""
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in 0..65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --host or "
                        "--port") from err
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def serve_forever(app, sock: socket.socket) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


@contextlib.contextmanager
def in_thread(app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0) -> Iterator[str]:
    """`app` served from a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server thread did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
