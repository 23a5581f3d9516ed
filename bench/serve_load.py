"""Load test of `cybertron serve`: concurrent streaming clients for a fixed time, then a leak check.

    python bench/serve_load.py                         # starts a server on a tiny random model, 64 clients, 30 s
    python bench/serve_load.py --clients 16 --seconds 5
    python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server
    python bench/serve_load.py --workload prefix --clients 16 --seconds 60   # a long shared system prompt
    python bench/serve_load.py --workload long --clients 4 --seconds 60      # long distinct prompts

Each client loops: a streaming /v1/completions or /v1/chat/completions request with a random prompt and
max_tokens; a share of them (--abort-share) hang up mid-stream, which must cancel the request server-side.
Workloads: "mixed" (short prompts), "prefix" (every request starts with the same long system prompt,
--prefix-words words, then a short question of its own: what a prefix cache serves from memory) and "long"
(distinct prompts of --long-words words, few new tokens: prefill-bound). Prints requests, tokens, prompt
tokens processed, errors, time to first token, any prefix-cache counters the server exports, and the KV
blocks still in use once the server is idle (leaked blocks: must be 0). Exits 1 on any error or leak.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["The quick brown fox", "Hello world! Servers stream tokens", "def add(a, b):\n    return",
           "Once upon a time, in a land far away, there lived", "import torch\n\nclass Model(nn.Module):"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one on a tiny model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model-dir", type=Path, default=None, help="HF dir to serve when starting one")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=64, help="upper bound of each request's max_tokens")
    parser.add_argument("--abort-share", type=float, default=0.2, help="share of clients that hang up early")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of a server started here")
    parser.add_argument("--workload", choices=("mixed", "prefix", "long"), default="mixed")
    parser.add_argument("--prefix-words", type=int, default=1000, help="shared system prompt (prefix workload)")
    parser.add_argument("--long-words", type=int, default=2000, help="prompt length (long workload)")
    return parser.parse_args()


WORDS = sorted({w for p in PROMPTS for w in p.split()})
SYSTEM_SEED = 1234  # every client draws the same shared system prompt


def words(rng: random.Random, n: int) -> str:
    """n words drawn from the tokenizer's own corpus, so a word costs about one token."""
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_prompt(rng: random.Random, args) -> tuple[str, str | None]:
    """(user text, system prompt or None) of one request for the chosen workload."""
    if args.workload == "prefix":
        return f"Question: {words(rng, 16)}", words(random.Random(SYSTEM_SEED), args.prefix_words)
    if args.workload == "long":
        return words(rng, args.long_words), None
    return rng.choice(PROMPTS), None


def make_tiny_model_dir(path: Path) -> Path:
    """A random `tiny`-shaped model with a small BPE tokenizer, saved as an HF directory."""
    from cybertron.data.tokenizer import train_bpe_tokenizer
    from cybertron.models.hf import save_hf_model
    from cybertron.models.llama import build_model
    from cybertron.models.presets import preset_config

    tokenizer = train_bpe_tokenizer([p * 20 for p in PROMPTS], vocab_size=512)
    # A 4k context, so the prefix and long workloads' prompts fit.
    model = build_model(preset_config("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=4096), seed=0)
    save_hf_model(model.state_dict(), model.config, path)
    tokenizer.save(path)
    return path


def start_server(model_dir: Path, api_key: str | None, clients: int, threads: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "cybertron", "serve", "--model", str(model_dir), "--port", str(port),
            "--device", "cpu", "--max-batch-size", str(clients)]
    if api_key:
        argv += ["--api-key", api_key]
    process = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


class Stats:
    def __init__(self) -> None:
        self.requests = self.aborted = self.tokens = self.errors = 0
        self.first_token_s: list[float] = []
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def one_request(http: httpx.AsyncClient, rng: random.Random, args, stats: Stats) -> None:
    abort_after = rng.randint(1, 4) if rng.random() < args.abort_share else None
    common = {"max_tokens": rng.randint(1, args.max_tokens), "temperature": rng.choice([0.0, 0.7, 1.0]),
              "stream": True}
    user, system = make_prompt(rng, args)
    if rng.random() < 0.5:
        prompt = user if system is None else f"{system}\n\n{user}"
        path, body = "/v1/completions", {"prompt": prompt, **common}
    else:
        messages = ([] if system is None else [{"role": "system", "content": system}]) + [
            {"role": "user", "content": user}]
        path, body = "/v1/chat/completions", {"messages": messages, **common}
    start, chunks, done = time.perf_counter(), 0, False
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            stats.error(f"{response.status_code} {(await response.aread())[:200]!r}")
            return
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                if '"error"' in line[:20]:
                    stats.error(line[:200])
                chunks += 1
                if chunks == 1:
                    stats.first_token_s.append(time.perf_counter() - start)
                if abort_after is not None and chunks >= abort_after:
                    break  # hang up mid-stream: the server must cancel and free the blocks
    stats.tokens += chunks
    if abort_after is not None and not done:
        stats.aborted += 1
    elif done:
        stats.requests += 1
    else:
        stats.error("stream ended without [DONE]")


async def run_clients(url: str, args) -> Stats:
    stats = Stats()
    deadline = time.monotonic() + args.seconds
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                await one_request(http, rng, args, stats)
            except httpx.HTTPError as err:
                stats.error(repr(err))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                 limits=httpx.Limits(max_connections=args.clients + 4)) as http:
        await asyncio.gather(*(client(i) for i in range(args.clients)))
    return stats


def idle_metrics(url: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        m = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        if m["cybertron_requests_running"] + m["cybertron_requests_waiting"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def main() -> int:
    args = parse_args()
    process = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            model_dir = args.model_dir or make_tiny_model_dir(Path(tmp) / "tiny")
            process, url = start_server(model_dir, args.api_key, args.clients, args.threads)
        try:
            before = idle_metrics(url)
            start = time.perf_counter()
            stats = asyncio.run(run_clients(url, args))
            elapsed = time.perf_counter() - start
            m = idle_metrics(url)
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
    leaked = int(m["cybertron_kv_blocks_used"])
    ttft = sorted(stats.first_token_s) or [float("nan")]
    print(f"{args.clients} clients for {elapsed:.1f} s: {stats.requests} requests completed, {stats.aborted} "
          f"aborted mid-stream, {stats.tokens} tokens streamed ({stats.tokens / elapsed:.0f}/s), "
          f"{stats.errors} errors")
    prompt_tokens = m["cybertron_prompt_tokens_total"] - before["cybertron_prompt_tokens_total"]
    print(f"workload {args.workload}: {int(prompt_tokens)} prompt tokens taken in ({prompt_tokens / elapsed:.0f}/s)")
    prefix = {k: v for k, v in m.items() if "prefix" in k}
    print("prefix cache: " + (", ".join(f"{k} {v - before.get(k, 0):.0f}" for k, v in prefix.items())
                              if prefix else "the server exports no prefix-cache counters"))
    print(f"time to first token: p50 {statistics.median(ttft) * 1000:.0f} ms, "
          f"p95 {ttft[int(0.95 * (len(ttft) - 1))] * 1000:.0f} ms")
    print(f"server: {int(m['cybertron_requests_cancelled_total'])} cancelled, "
          f"{int(m['cybertron_preemptions_total'])} preemptions, leaked KV blocks {leaked} "
          f"(free {int(m['cybertron_kv_blocks_free'])} of {int(m['cybertron_kv_blocks_total'])})")
    for sample in stats.error_samples:
        print(f"  error: {sample}")
    return 1 if stats.errors or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
