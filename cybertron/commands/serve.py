"""`cybertron serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    cybertron serve --model RUN_OR_HF_DIR [--host H] [--port P] [--api-key KEY] [--config serve.toml]
    cybertron serve --model DIR --speculative ngram|draft [--spec-k K] [--draft-model DIR]

Endpoints: /v1/completions and /v1/chat/completions (streaming or not), /v1/models, /health and /metrics
(the app is cybertron/serve/server.py).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass, field

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.runs import load_for_inference
from cybertron.serve.engine import Engine
from cybertron.serve.options import (
    MODEL_SHORTCUTS,
    OUT_IS_NOT_AN_INPUT,
    SPECULATIVE_SHORTCUTS,
    ModelSourceSection,
    SpeculativeSection,
    validate_source,
)
from cybertron.serve.server import MAX_BODY_BYTES, create_app


@dataclass
class ServerSection:
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    api_key: str = opt("", "require `Authorization: Bearer KEY` on /v1/ (empty = no key)")
    max_batch_size: int = opt(64, "requests decoded together at most")
    num_blocks: int = opt(0, "KV cache blocks; 0 = from free memory")
    block_size: int = opt(16, "tokens per KV cache block")
    model_name: str = opt("", "the name clients use; empty = the directory's")
    max_body_bytes: int = opt(MAX_BODY_BYTES, "largest request body accepted; a larger one gets 413")


@dataclass
class ServeConfig:
    model: ModelSourceSection = field(default_factory=ModelSourceSection)
    server: ServerSection = field(default_factory=ServerSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)


SHORTCUTS = {**MODEL_SHORTCUTS, "--host": "server.host", "--port": "server.port", "--api-key": "server.api_key",
             "--max-batch-size": "server.max_batch_size", "--num-blocks": "server.num_blocks",
             "--block-size": "server.block_size", "--model-name": "server.model_name",
             "--max-body-bytes": "server.max_body_bytes", **SPECULATIVE_SHORTCUTS}


def validate_server(s: ServerSection) -> None:
    raise_first_failure([
        (s.max_batch_size >= 1, f"server.max_batch_size must be >= 1, got {s.max_batch_size}"),
        (s.block_size >= 1, f"server.block_size must be >= 1, got {s.block_size}"),
        (s.max_body_bytes >= 1, f"server.max_body_bytes must be >= 1, got {s.max_body_bytes}"),
        (s.num_blocks >= 0, f"server.num_blocks must be >= 1 (or 0 = from memory), got {s.num_blocks}"),
    ])


def check_listen_address(host: str, port: int) -> None:
    """UserError if the server could not listen there (port out of range or taken, unknown host)."""
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in 0..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --host "
                        "or --port") from err


def main(argv: list[str]) -> int:
    import uvicorn

    if "-h" in argv or "--help" in argv:
        print(help_text(ServeConfig(), "serve", SHORTCUTS))
        return 0
    cfg = parse_args(argv, ServeConfig(), SHORTCUTS, OUT_IS_NOT_AN_INPUT)
    s = cfg.server
    validate_server(s)
    cfg.speculative.validate()
    device = validate_source(cfg.model)
    check_listen_address(s.host, s.port)  # before minutes of model loading, not after
    model, tokenizer, name = load_for_inference(*cfg.model.source(), device=device, dtype=cfg.model.dtype)
    engine = Engine(model, tokenizer, max_batch_size=s.max_batch_size, num_blocks=s.num_blocks or None,
                    block_size=s.block_size, speculative=cfg.speculative.build(device, cfg.model.dtype))
    name = s.model_name or name
    app = create_app(engine, tokenizer, name, api_key=s.api_key or None, max_body_bytes=s.max_body_bytes)
    spec = cfg.speculative
    speculating = f", speculative {spec.method} k={spec.k}" if spec.method != "off" else ""
    print(f"serving {name} on http://{s.host}:{s.port} ({device}, "
          f"{engine.cache.num_total_blocks} KV blocks of {s.block_size} tokens{speculating})", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
    return 0
