"""`cybertron dashboard`: a web page over a folder of runs, with live metric curves and a chat playground.

    cybertron dashboard RUNS_DIR [--host 127.0.0.1] [--port 8080] [--serve-url http://127.0.0.1:8000]
                                 [--serve-api-key KEY]

The page lists the runs in RUNS_DIR (method, status, step, loss, tokens/s), draws the metrics of the runs ticked
(updated while they train) and chats with the `cybertron serve` at --serve-url through the dashboard's own
origin (cybertron/dashboard/proxy.py says why a relay rather than CORS).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.dashboard.folder import RunsFolder
from cybertron.dashboard.server import bind, serve_forever, url_of


@dataclass
class DashboardSection:
    runs_dir: str = opt("", "the folder holding the run directories to show (or give it as the first argument)")
    host: str = opt("127.0.0.1", "address to listen on (the page shows your runs' files: keep it local, or "
                                 "reach it through an SSH tunnel)")
    port: int = opt(8080, "port to listen on; 0 = any free port")
    serve_url: str = opt("http://127.0.0.1:8000", "a running `cybertron serve` the chat playground talks to")
    serve_api_key: str = opt("", "the server's --api-key, sent by the dashboard (never given to the browser)")


@dataclass
class DashboardConfig:
    dashboard: DashboardSection = field(default_factory=DashboardSection)


SHORTCUTS = {"--runs-dir": "dashboard.runs_dir", "--host": "dashboard.host", "--port": "dashboard.port",
             "--serve-url": "dashboard.serve_url", "--serve-api-key": "dashboard.serve_api_key"}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(DashboardConfig(), "dashboard", SHORTCUTS).replace("dashboard", "dashboard RUNS_DIR", 1))
        return 0
    positional = [] if not argv or argv[0].startswith("-") else [argv[0]]
    d = parse_args(argv[len(positional):], DashboardConfig(), SHORTCUTS).dashboard
    if positional:
        d.runs_dir = positional[0]
    raise_first_failure([
        (bool(d.runs_dir), "give the folder of run directories: `cybertron dashboard RUNS_DIR`"),
        (d.serve_url.startswith(("http://", "https://")),
         f"--serve-url must be an http:// or https:// URL, got {d.serve_url!r}"),
    ])
    folder = RunsFolder(Path(d.runs_dir))
    sock = bind(d.host, d.port)
    from cybertron.dashboard.app import create_app  # fastapi and httpx: the [dashboard] extra
    from cybertron.dashboard.proxy import ServeProxy

    print(f"dashboard for {folder.root} ({len(folder.runs())} runs) on {url_of(sock)}; chat playground -> "
          f"{d.serve_url}", file=sys.stderr, flush=True)
    serve_forever(create_app(folder, ServeProxy(d.serve_url, d.serve_api_key)), sock)
    return 0
