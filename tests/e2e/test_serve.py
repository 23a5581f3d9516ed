"""`cybertron serve` as a user runs it: a real server process, the official `openai` client, malformed
requests answered with OpenAI-style errors, client disconnects, a short concurrent load, and no KV block
leaked at the end."""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

API_KEY = "test-key"
CONTEXT = 512
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 20,
          "Hello world! Servers stream tokens to clients as they are generated.\n\n" * 20,
          "def add(a, b):\n    return a + b\n" * 20]


def make_model_dir(path):
    """A tiny random Llama saved by transformers, and a byte-level BPE tokenizer.json trained with
    `tokenizers`, plus a tokenizer_config.json naming eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                            "chat_template": TEMPLATE}))
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                      eos_token_id=tokenizer.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny-llama"
    make_model_dir(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as (url, _):
        yield url


@contextlib.contextmanager
def running_server(model_dir):
    """`cybertron serve` over model_dir in a subprocess: yields (its url, the process)."""
    port = free_port()
    log = open(model_dir.parent / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model is fastest on one thread of a shared box
    # Part of the settings from a TOML file (the key the auth tests need is only there), part from flags.
    config = model_dir.parent / "serve.toml"
    config.write_text(f'[model]\ndevice = "cpu"\n[server]\napi_key = "{API_KEY}"\nmax_batch_size = 16\n'
                      'num_blocks = 512\n')
    process = subprocess.Popen([sys.executable, "-m", "cybertron", "serve", "--config", str(config),
                                "--model", str(model_dir), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def wait_healthy(url, process, log, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {process.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("server did not become healthy in time")


def metrics(url):
    text = httpx.get(f"{url}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def wait_idle(url, timeout=10.0):
    """Metrics once nothing runs, waits or holds a block (cancellation reaches the engine thread async)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["cybertron_requests_running"] == m["cybertron_requests_waiting"] == 0
        if (idle and m["cybertron_kv_blocks_used"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_completions_streamed_and_not_agree(client):
    kwargs = dict(model="tiny-llama", prompt="The quick brown", max_tokens=12, temperature=0.0)
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    pieces = [chunk.choices[0].text for chunk in client.completions.create(**kwargs, stream=True)
              if chunk.choices]
    assert "".join(pieces) == whole.choices[0].text


def test_chat_streamed_and_not_agree(client):
    kwargs = dict(model="tiny-llama", messages=[{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Hello world!"}],
                  max_tokens=10, temperature=0.7, seed=11, logprobs=True)
    whole = client.chat.completions.create(**kwargs)
    reply = whole.choices[0]
    assert reply.message.role == "assistant"
    assert len(reply.logprobs.content) == whole.usage.completion_tokens
    assert all(entry.logprob <= 0.0 for entry in reply.logprobs.content)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.message.content
    assert chunks[-1].choices[0].finish_reason == reply.finish_reason


LONG = list(range(1, 100)) * 6  # 594 token ids: more than the 512-token context

MALFORMED = [
    ("completions", "{not json", 400, None, "invalid_json"),
    ("completions", {"model": "gpt-9", "prompt": "Hi"}, 404, "model", "model_not_found"),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "Hi", "max_tokens": 100_000}, 400, "max_tokens", "context_length_exceeded"),
    ("completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("completions", {"prompt": "Hi", "temperature": -0.5}, 400, "temperature", None),
    ("completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature", None),
    ("completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p", None),
    ("completions", {"prompt": "Hi", "top_p": 1.5}, 400, "top_p", None),
    ("completions", {"prompt": "Hi", "top_k": 5, "stream": True, "temperature": -1}, 400, "temperature", None),
    ("completions", {"temperature": 0.5}, 400, "prompt", None),
    ("chat/completions", {"messages": []}, 400, "messages", None),
    ("chat/completions", {"messages": "hello"}, 400, "messages", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages",
     "context_length_exceeded"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 600},
     400, "max_tokens", "context_length_exceeded"),
    # caps and ranges (top_k: -1 and 0 mean off, as in vLLM)
    ("completions", {"prompt": "Hi", "top_k": -5}, 400, "top_k", None),
    ("completions", {"prompt": "Hi", "seed": 2**64}, 400, "seed", None),
    ("completions", {"prompt": "Hi", "seed": -(2**63) - 1}, 400, "seed", None),
    ("completions", {"prompt": "Hi", "n": 17}, 400, "n", None),
    ("completions", {"prompt": ["Hi"] * 20, "n": 8}, 400, "n", None),
    ("completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", None),
    ("completions", {"prompt": "Hi", "stop": [f"s{i}" for i in range(17)]}, 400, "stop", None),
    ("completions", {"prompt": "Hi", "stop": ["x" * 513]}, 400, "stop", None),
    # lone surrogates, which JSON lets through
    ("completions", {"prompt": "Hi \ud800 there"}, 400, "prompt", None),
    ("completions", {"prompt": ["ok", "\udfff"]}, 400, "prompt", None),
    ("completions", {"prompt": "Hi", "stop": ["\ud83d"]}, 400, "stop", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages.0.content", None),
    ("chat/completions", {"messages": [{"role": "system", "content": "Hi"},
                                       {"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]},
     400, "messages.1.content", None),
    # fields we do not implement are refused by name, not dropped; so are requests structured output cannot
    # honour (this model's template renders no tool calls)
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "tools", "unsupported_parameter"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "required"},
     400, "tool_choice", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                          "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                          "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    # logit_bias and the penalties: OpenAI's ranges, ids in the vocabulary (400 tokens), at most 300 entries
    ("completions", {"prompt": "Hi", "logit_bias": {"5": 100.5}}, 400, "logit_bias", None),
    ("completions", {"prompt": "Hi", "logit_bias": {"400": 1}}, 400, "logit_bias", None),
    ("completions", {"prompt": "Hi", "logit_bias": {"fox": 1}}, 400, "logit_bias", None),
    ("completions", {"prompt": "Hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias", None),
    ("completions", {"prompt": "Hi", "presence_penalty": 2.5}, 400, "presence_penalty", None),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": -3},
     400, "frequency_penalty", None),
    ("completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("completions", {"prompt": "Hi", "min_p": 0.1}, 400, "min_p", "unsupported_parameter"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}]},
     400, "messages.0.tool_calls.0.function.arguments", None),
]


@pytest.mark.parametrize("endpoint, body, status, param, code", MALFORMED)
def test_malformed_requests_get_openai_errors(server, endpoint, body, status, param, code):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server}/v1/{endpoint}", content=content, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["param"] == param and error["code"] == code


def test_bad_api_key_is_401(server):
    response = httpx.post(f"{server}/v1/completions", json={"prompt": "Hi"},
                          headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_server_keeps_serving_after_errors(client):
    assert client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=3).choices[0].text is not None


def test_client_disconnect_cancels_the_request(server):
    before = metrics(server)["cybertron_requests_cancelled_total"]
    body = {"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    m = wait_idle(server)
    assert m["cybertron_requests_cancelled_total"] == before + 1
    assert m["cybertron_kv_blocks_used"] == 0


def test_client_giving_up_on_a_non_streamed_request_cancels_it(server):
    before = metrics(server)["cybertron_requests_cancelled_total"]
    body = {"prompt": "Hi", "max_tokens": 500, "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.1),
                   headers={"Authorization": f"Bearer {API_KEY}"})
    m = wait_idle(server)
    assert m["cybertron_requests_cancelled_total"] > before
    assert m["cybertron_kv_blocks_used"] == 0


async def _load(url, clients, seconds):
    """Streaming clients in a loop until the deadline; every fourth request hangs up after a few chunks."""
    stats = {"requests": 0, "chunks": 0, "errors": 0, "aborted": 0}
    deadline = time.monotonic() + seconds
    rng = random.Random(0)

    async def worker(http):
        while time.monotonic() < deadline:
            abort = rng.random() < 0.25
            body = {"prompt": rng.choice(CORPUS)[:rng.randint(5, 200)], "max_tokens": rng.randint(4, 48),
                    "temperature": rng.choice([0.0, 0.8]), "stream": True}
            try:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        stats["errors"] += 1
                        continue
                    seen_done = False
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            seen_done = True
                        elif line.startswith("data: "):
                            stats["chunks"] += 1
                            if abort and stats["chunks"] % 3 == 0:
                                break
                    stats["aborted" if abort and not seen_done else "requests"] += 1
                    if not abort and not seen_done:
                        stats["errors"] += 1
            except httpx.HTTPError:
                stats["errors"] += 1

    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(worker(http) for _ in range(clients)))
    return stats


def test_short_concurrent_load_has_no_errors_and_leaks_no_blocks(server):
    stats = asyncio.run(_load(server, clients=16, seconds=5))
    assert stats["errors"] == 0 and stats["requests"] > 16
    m = wait_idle(server)
    assert m["cybertron_kv_blocks_used"] == 0
    assert m["cybertron_kv_blocks_free"] == m["cybertron_kv_blocks_total"] == 512
    assert m["cybertron_generated_tokens_total"] > stats["chunks"] / 2


def big_prompt(chars):
    """Text that is slow for the tiny test tokenizer to encode: words it has never seen."""
    rng = random.Random(0)
    words = ["alpha", "zebra", "quartz", "x1y2", "jumbo", "vivid"]
    text = " ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(chars // 7))
    return text[:chars]


def health_latencies_during(url, body, endpoint="completions"):
    """(the big request's status, /health round trips in seconds while it was in flight)."""
    async def run():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            big = asyncio.ensure_future(http.post(f"/v1/{endpoint}", json=body))
            latencies = []
            while not big.done():
                start = time.perf_counter()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)
            return (await big).status_code, latencies

    return asyncio.run(run())


def test_a_huge_prompt_is_refused_quickly_while_health_answers(server):
    """7 MB of text (under the 8 MiB body limit): only a prefix is encoded before it is refused, in a worker
    thread; /health keeps answering meanwhile."""
    start = time.perf_counter()
    status, latencies = health_latencies_during(server, {"prompt": big_prompt(7_000_000), "max_tokens": 4})
    elapsed = time.perf_counter() - start
    print(f"7 MB prompt refused in {elapsed:.2f} s; /health: {len(latencies)} probes, max {max(latencies):.3f} s")
    assert status == 400 and elapsed < 10
    assert latencies and max(latencies) < 1.0


def test_unsupported_openai_fields_are_refused_by_name_and_neutral_ones_accepted(client):
    messages = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    refused = [{"tools": [tool]}, {"modalities": ["audio"]}]  # tools: this model's template renders no calls
    for fields in refused:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=2, **fields)
        assert err.value.param == next(iter(fields)) and err.value.code == "unsupported_parameter"
    # What SDKs send by default or to mean "nothing": accepted. `user` is metadata: accepted, unused.
    reply = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=2, presence_penalty=0, frequency_penalty=0.0,
        logit_bias={}, user="alice", tool_choice="none", response_format={"type": "text"}, top_p=1.0)
    assert reply.choices[0].message.role == "assistant"


def _penalized_greedy(model_dir, prompt, n, logit_bias=None, presence=0.0, frequency=0.0):
    """Reference: transformers' logits over everything so far, OpenAI's formula applied, argmax; stops at eos."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    tokens, generated = tokenizer.encode(prompt).ids, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([tokens + generated])).logits[0, -1].float()
            for token, bias in (logit_bias or {}).items():
                logits[int(token)] += bias
            for token in set(generated):
                logits[token] -= frequency * generated.count(token) + presence
            generated.append(int(logits.argmax()))
            if generated[-1] == model.config.eos_token_id:
                break
    return tokenizer, tokenizer.decode(generated)


def test_logit_bias_and_penalties_follow_openais_formula(client, model_dir):
    prompt, n = "The quick brown", 16
    kwargs = dict(model="tiny-llama", prompt=prompt, max_tokens=n, temperature=0.0)
    tokenizer, plain = _penalized_greedy(model_dir, prompt, n)
    forced = tokenizer.encode(" fox").ids[0]
    reply = client.completions.create(**kwargs, logit_bias={str(forced): 100})
    assert reply.choices[0].text == tokenizer.decode([forced] * n)
    # Two concurrent requests (batched together by the server), each with its own penalties.
    settings = [dict(frequency_penalty=2.0), dict(presence_penalty=1.0, frequency_penalty=-0.5,
                                                  logit_bias={str(forced): -100})]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda extra: client.completions.create(**kwargs, **extra), settings))
    for reply, extra in zip(replies, settings):
        expected = _penalized_greedy(model_dir, prompt, n, extra.get("logit_bias"), extra.get("presence_penalty", 0),
                                     extra.get("frequency_penalty", 0))[1]
        assert reply.choices[0].text == expected, extra
    assert replies[0].choices[0].text != plain


def test_a_body_over_the_limit_is_413(server):
    """Refused from its Content-Length before it is read, and a chunked body (no length) cut off once it
    passes the limit (8 MiB by default)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    over = b'{"prompt": "' + b"a" * (8 << 20) + b'"}'
    response = httpx.post(f"{server}/v1/completions", content=over, headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield over[:1 << 20]
        for start in range(1 << 20, len(over), 1 << 20):
            yield over[start:start + (1 << 20)]

    response = httpx.post(f"{server}/v1/completions", content=chunked(), headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.slow
def test_a_model_with_nan_weights_gets_errors_and_the_server_stays_up(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "nan-llama"
    make_model_dir(model_dir)
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"][7] = float("nan")  # one value: every logit becomes NaN
    save_file(tensors, weights, metadata={"format": "pt"})
    with running_server(model_dir) as (url, process):
        nan_client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as err:
                nan_client.completions.create(model="nan-llama", prompt="Hello", max_tokens=4)
            assert err.value.code == "non_finite_logits" and "non-finite logits" in err.value.message
            stream = nan_client.chat.completions.create(model="nan-llama", stream=True, max_tokens=4,
                                                        messages=[{"role": "user", "content": "Hi"}])
            with pytest.raises(openai.APIError, match="non-finite logits"):
                list(stream)
            assert httpx.get(f"{url}/health").status_code == 200
        m = wait_idle(url)
        assert process.poll() is None and m["cybertron_kv_blocks_used"] == 0
