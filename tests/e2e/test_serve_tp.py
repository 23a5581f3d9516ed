"""`cybertron serve --tp 2` and `cybertron generate --tp 2` as a user runs them: two ranks started by the command
(torchrun, gloo), answering what one process answers: the official `openai` client against a one-process
server, a client that leaves mid-stream without putting the ranks out of step, and every rank gone after
SIGTERM to the server or Ctrl-C (SIGINT to its whole process group)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import cli_env
from tests.e2e.test_serve import free_port, make_model_dir, wait_healthy, wait_idle

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown", "def add(a, b):", "Hello world! Servers"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve_tp") / "tiny-llama"
    make_model_dir(path)
    return path


@contextlib.contextmanager
def serving(model_dir: Path, *flags: str, log_name: str = "server.log"):
    """`cybertron serve` over model_dir in its own session (so a group signal reaches it alone): yields
    (url, process, log path)."""
    port = free_port()
    log_path = model_dir.parent / log_name
    log = open(log_path, "w+")
    process = subprocess.Popen([sys.executable, "-m", "cybertron", "serve", "--model", str(model_dir), "--device",
                                "cpu", "--num-blocks", "256", "--port", str(port), *flags],
                               stdout=log, stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log, timeout=120)
        yield url, process, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def servers(model_dir):
    """(the tp=2 server's url, process and log; a one-process server's url), started side by side."""
    with serving(model_dir, "--tp", "2", log_name="tp.log") as tp, serving(model_dir, log_name="one.log") as one:
        yield tp, one[0]


def clients(servers) -> tuple:
    (tp_url, _, _), one_url = servers
    return tuple(openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) for url in (tp_url, one_url))


def completion(client, stream: bool, **kwargs) -> str:
    if not stream:
        return client.completions.create(model="tiny-llama", **kwargs).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(model="tiny-llama", stream=True, **kwargs)
                   if c.choices)


def chat(client, stream: bool, **kwargs) -> str:
    if not stream:
        return client.chat.completions.create(model="tiny-llama", messages=CHAT, **kwargs).choices[0].message.content
    chunks = client.chat.completions.create(model="tiny-llama", messages=CHAT, stream=True, **kwargs)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_completions_match_one_process(servers):
    tp, one = clients(servers)
    for prompt in PROMPTS:
        want = completion(one, False, prompt=prompt, max_tokens=16, temperature=0.0)
        assert want and completion(tp, False, prompt=prompt, max_tokens=16, temperature=0.0) == want
        assert completion(tp, True, prompt=prompt, max_tokens=16, temperature=0.0) == want
    sampled = dict(prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.95, seed=5)
    assert completion(tp, True, **sampled) == completion(one, False, **sampled)


def test_chat_matches_one_process(servers):
    tp, one = clients(servers)
    want = chat(one, False, max_tokens=12, temperature=0.0)
    assert want and chat(tp, False, max_tokens=12, temperature=0.0) == want
    assert chat(tp, True, max_tokens=12, temperature=0.0) == want


def test_a_client_leaving_mid_stream_keeps_the_ranks_in_step(servers):
    tp, one = clients(servers)
    (tp_url, _, _), _ = servers
    with httpx.stream("POST", f"{tp_url}/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 200,
                                                               "temperature": 0.0, "stream": True},
                      timeout=60) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(3)]  # a few tokens arrived, then the client goes away
    assert wait_idle(tp_url)["cybertron_kv_blocks_used"] == 0  # cancelled on rank 0 and its blocks freed
    for prompt in PROMPTS[:2]:
        want = completion(one, False, prompt=prompt, max_tokens=16, temperature=0.0)
        assert completion(tp, True, prompt=prompt, max_tokens=16, temperature=0.0) == want


def rank_pids(process: subprocess.Popen) -> list[int]:
    """The ranks torchrun started: the children of the command's process."""
    return [int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def assert_every_rank_stopped(process: subprocess.Popen, ranks: list[int], log_path: Path) -> None:
    assert process.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    log = log_path.read_text()
    assert "stopped: all 2 ranks shut down" in log  # rank 0 passed the barrier every rank joins at exit
    assert "Traceback" not in log


def test_sigterm_stops_every_rank(servers):  # last of the tests that share the servers
    (_, process, log_path), _ = servers
    ranks = rank_pids(process)
    assert len(ranks) == 2
    process.send_signal(signal.SIGTERM)
    assert_every_rank_stopped(process, ranks, log_path)


def test_ctrl_c_stops_every_rank(model_dir):
    with serving(model_dir, "--tp", "2", log_name="ctrl_c.log") as (url, process, log_path):
        ranks = rank_pids(process)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3},
                          timeout=60).status_code == 200
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every rank gets it too
        assert_every_rank_stopped(process, ranks, log_path)


def test_generate_matches_one_process(model_dir):
    """`generate --tp 2` starts its ranks and prints what one process prints (more prompts, without starting a
    world for each: tests/distributed/test_generate_tp.py)."""
    from cybertron.runs import load_for_inference
    from cybertron.serve.generate import generate_stream
    from cybertron.serve.sampling import SamplingParams

    model, tokenizer, _ = load_for_inference(model_dir, False, device=torch.device("cpu"))
    want = "".join(generate_stream(model, tokenizer, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20)))
    run = subprocess.run([sys.executable, "-m", "cybertron", "generate", "--model", str(model_dir), "--device", "cpu",
                          "--tp", "2", "--prompt", PROMPTS[0], "--max-new-tokens", "20", "--greedy"],
                         capture_output=True, text=True, env=cli_env(), timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == want + "\n" and len(want) > 5
