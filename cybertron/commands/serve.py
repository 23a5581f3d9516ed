"""`cybertron serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    cybertron serve --model RUN_OR_HF_DIR [--lora NAME=PATH ...] [--host H] [--port P] [--api-key KEY]
                    [--config serve.toml] [--tp N]
    cybertron serve --model DIR --speculative ngram|draft [--spec-k K] [--draft-model DIR]

Each --lora serves a LoRA/DoRA adapter (a PEFT adapter directory or a cybertron fine-tuning run) over the base
as a model of its own: a request's `model` field picks the base or an adapter by name, and requests for
different adapters share one batch (cybertron/serve/multi_lora.py).

Endpoints: /v1/completions and /v1/chat/completions (streaming or not), /v1/models, /health and /metrics
(the app is cybertron/serve/server.py). `--tp N` shards the model over N local ranks (serve/tensor_parallel.py):
rank 0 serves HTTP and the others mirror its engine.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World
from cybertron.runs import load_for_inference, read_base, read_served_adapter
from cybertron.serve.async_engine import AsyncEngine
from cybertron.serve.engine import Engine
from cybertron.serve.mirror import LeaderEngine, command_channel, follow
from cybertron.serve.options import (
    MODEL_SHORTCUTS,
    OUT_IS_NOT_AN_INPUT,
    SPECULATIVE_SHORTCUTS,
    ModelSourceSection,
    SpeculativeSection,
    validate_source,
)
from cybertron.serve.server import MAX_BODY_BYTES, create_app
from cybertron.serve.tensor_parallel import (
    TensorParallelSection,
    agreed_num_blocks,
    check_tp_degree,
    check_tp_devices,
    check_tp_section,
    launch_ranks,
    needs_launch,
    rank_engine,
    run_on_ranks,
    shard_model,
)


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
    lora: list[str] = opt([], "serve a LoRA/DoRA adapter over the base as NAME=PATH (a PEFT adapter directory or "
                              "a cybertron fine-tuning run); repeat for several; requests choose it by `model`")


@dataclass
class ServeConfig:
    model: ModelSourceSection = field(default_factory=ModelSourceSection)
    server: ServerSection = field(default_factory=ServerSection)
    parallel: TensorParallelSection = field(default_factory=TensorParallelSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)


SHORTCUTS = {**MODEL_SHORTCUTS, "--host": "server.host", "--port": "server.port", "--api-key": "server.api_key",
             "--max-batch-size": "server.max_batch_size", "--num-blocks": "server.num_blocks",
             "--block-size": "server.block_size", "--model-name": "server.model_name",
             "--max-body-bytes": "server.max_body_bytes", "--lora": "server.lora",
             "--tp": "parallel.tp", **SPECULATIVE_SHORTCUTS}


def validate_server(s: ServerSection) -> None:
    raise_first_failure([
        (s.max_batch_size >= 1, f"server.max_batch_size must be >= 1, got {s.max_batch_size}"),
        (s.block_size >= 1, f"server.block_size must be >= 1, got {s.block_size}"),
        (s.max_body_bytes >= 1, f"server.max_body_bytes must be >= 1, got {s.max_body_bytes}"),
        (s.num_blocks >= 0, f"server.num_blocks must be >= 1 (or 0 = from memory), got {s.num_blocks}"),
    ])


def parse_lora(entries: list[str], base_name: str) -> list[tuple[str, Path]]:
    """--lora NAME=PATH entries as (name, path); UserError for a malformed, repeated or base-shadowing name."""
    pairs: list[tuple[str, Path]] = []
    for entry in entries:
        name, eq, path = entry.partition("=")
        name = name.strip()
        if not eq or not name or not path:
            raise UserError(f"--lora {entry!r}: give NAME=PATH (the name clients send as `model`, then the "
                            "adapter's directory)")
        if name == base_name or name in (n for n, _ in pairs):
            raise UserError(f"--lora {entry!r}: the name {name!r} is already taken by "
                            f"{'the base model' if name == base_name else 'another --lora'}; choose another")
        pairs.append((name, Path(path)))
    return pairs


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
    if "-h" in argv or "--help" in argv:
        print(help_text(ServeConfig(), "serve", SHORTCUTS))
        return 0
    cfg = parse_args(argv, ServeConfig(), SHORTCUTS, OUT_IS_NOT_AN_INPUT)
    s = cfg.server
    validate_server(s)
    check_tp_section(cfg.parallel)
    if s.lora and cfg.parallel.tp > 1:
        raise UserError("--lora cannot be combined with --tp yet (adapters are not sharded over ranks); serve "
                        "the adapters on one device, or merge them into the base with `cybertron export --merge`")
    cfg.speculative.validate()
    if cfg.parallel.tp > 1 and cfg.speculative.method != "off":
        raise UserError("--speculative cannot be combined with --tp yet; use one or the other")
    device = validate_source(cfg.model)
    env = DistEnv.from_environ()  # torchrun's variables, read once here
    if env.is_main:
        check_listen_address(s.host, s.port)  # before minutes of model loading, not after
    if cfg.parallel.tp > 1:  # from the model's config alone, before any rank starts or loads weights
        check_tp_degree(read_base(cfg.model.source()[0])[0], cfg.parallel.tp)
    if needs_launch(cfg.parallel.tp, env):
        check_tp_devices(device, cfg.parallel.tp)
        return launch_ranks(cfg.parallel.tp, argv, "serve", signal_ends_well=True)
    if env.world_size > 1:
        run_on_ranks(env, cfg.parallel.tp, device, cfg.parallel.timeout_s, lambda world: serve_rank(cfg, world))
        if env.is_main:
            print(f"stopped: all {env.world_size} ranks shut down", file=sys.stderr, flush=True)
        return 0
    source = cfg.model.source()
    name = s.model_name or source[0].resolve().name
    lora = parse_lora(s.lora, name)
    adapters = [read_served_adapter(n, path) for n, path in lora]  # before the base: their errors come first
    model, tokenizer, _ = load_for_inference(*source, device=device, dtype=cfg.model.dtype)
    engine = Engine(model, tokenizer, max_batch_size=s.max_batch_size, num_blocks=s.num_blocks or None,
                    block_size=s.block_size, adapters=adapters,
                    speculative=cfg.speculative.build(
                        lambda path: load_for_inference(path, False, device=device, dtype=cfg.model.dtype)[0]))
    for adapter in adapters:
        if adapter.trained_on and Path(adapter.trained_on).resolve() != source[0].resolve():
            print(f"note: adapter {adapter.name!r} was trained over {adapter.trained_on}, not over the served "
                  f"{source[0]}; its shapes match, so it is served", file=sys.stderr)
    run_server(cfg, engine, tokenizer, name, str(device))
    return 0


def run_server(cfg: ServeConfig, engine: Engine, tokenizer, name: str, where: str) -> None:
    """The HTTP server over `engine` until SIGINT/SIGTERM; its engine loop is stopped when this returns."""
    import uvicorn

    s = cfg.server
    name = s.model_name or name
    runner = AsyncEngine(engine)
    app = create_app(runner, tokenizer, name, api_key=s.api_key or None, max_body_bytes=s.max_body_bytes)
    adapters = getattr(engine, "adapter_names", [])
    served = f"{name} (+ adapters {', '.join(adapters)})" if adapters else name
    spec = cfg.speculative
    speculating = f", speculative {spec.method} k={spec.k}" if spec.method != "off" else ""
    print(f"serving {served} on http://{s.host}:{s.port} ({where}, "
          f"{engine.cache.num_total_blocks} KV blocks of {s.block_size} tokens{speculating})", file=sys.stderr,
          flush=True)
    try:
        uvicorn.run(app, host=s.host, port=s.port, log_level="warning")
    finally:
        runner.stop()  # already stopped by the app's shutdown, unless uvicorn ended before it ran


def serve_rank(cfg: ServeConfig, world: World) -> None:
    """One rank of `serve --tp N`: load and shard the model; rank 0 serves HTTP, the others follow its engine."""
    s = cfg.server
    model, tokenizer, name = load_for_inference(*cfg.model.source(), device=world.device, dtype=cfg.model.dtype)
    shard_model(model, world.mesh["tp"])
    num_blocks = agreed_num_blocks(model, s.block_size, world.device, s.max_batch_size, s.num_blocks or None)
    channel = command_channel()
    engine = rank_engine(model, tokenizer, world, channel, max_batch_size=s.max_batch_size,
                         num_blocks=num_blocks, block_size=s.block_size)
    if not isinstance(engine, LeaderEngine):
        follow(engine, channel)
        return
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found:
    # a no-op one lets this rank go on to stop the followers and leave with them, instead of dying alone.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        run_server(cfg, engine, tokenizer, name, f"{world.device}, tp={world.dims.tp}")
    finally:
        engine.stop_followers()
