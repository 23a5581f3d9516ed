"""`cybertron serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    cybertron serve --out RUN_DIR | --model HF_DIR [--host H] [--port P] [--api-key KEY]

Endpoints: /v1/completions and /v1/chat/completions (streaming or not), /v1/models, /health and /metrics
(the app is cybertron/serve/server.py).
"""

from __future__ import annotations

import socket
import sys

from cybertron.config import ArgumentParser
from cybertron.errors import UserError
from cybertron.runs import load_for_inference
from cybertron.serve.engine import Engine
from cybertron.serve.options import add_model_flags, resolve_device
from cybertron.serve.server import create_app


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cybertron serve", description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/")
    parser.add_argument("--max-batch-size", type=int, default=64, help="requests decoded together at most")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument("--model-name", default=None, help="the name clients use (default: the directory's)")
    return parser


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

    args = build_parser().parse_args(argv)
    for flag in ("max_batch_size", "block_size", "num_blocks"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    check_listen_address(args.host, args.port)  # before minutes of model loading, not after
    device = resolve_device(args.device)
    model, tokenizer, name = load_for_inference(args.out, args.model, device, args.dtype)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, num_blocks=args.num_blocks,
                    block_size=args.block_size)
    app = create_app(engine, tokenizer, args.model_name or name, api_key=args.api_key)
    print(f"serving {args.model_name or name} on http://{args.host}:{args.port} ({device}, "
          f"{engine.cache.num_total_blocks} KV blocks of {args.block_size} tokens)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
