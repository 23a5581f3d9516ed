"""Prompts are encoded off the event loop and a text far beyond the context is refused after encoding only a
prefix of it: the ids of every text that fits are exactly the tokenizer's, and a refused text never fits."""

import random
import threading
import time

import pytest
from fastapi.testclient import TestClient

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import InvalidParameter
from cybertron.serve.server import create_app, encode_prompt

WORDS = ["The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog.", "Hello", "world!", "\n\n", "def",
         "add(a,", "b):", "return", "a + b", "zq", "ünïcödé", "日本語", "🙂"]


def texts(seed, count=40):
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.choice([5, 50, 300, 2000])
        yield "".join(rng.choice(WORDS) + rng.choice([" ", "", "  ", "\t"]) for _ in range(n))


@pytest.mark.parametrize("context", [8, 32, 128])
def test_encoding_is_exact_when_the_prompt_fits_and_refusals_are_sound(tokenizer, context):
    refused = accepted = 0
    for text in texts(context):
        full = tokenizer.encode(text, add_special_tokens=True)
        try:
            ids = encode_prompt(tokenizer, text, context, "prompt", add_special_tokens=True)
        except InvalidParameter as err:
            assert len(full) > context, "refused a prompt that fits"
            assert err.param == "prompt" and err.code == "context_length_exceeded"
            refused += 1
        else:
            assert ids == full
            accepted += 1
    assert refused and accepted


def test_a_huge_text_costs_a_prefix_not_the_whole(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 200_000
    start = time.perf_counter()
    with pytest.raises(InvalidParameter, match="context is 256"):
        encode_prompt(tokenizer, text, 256, "prompt")
    assert time.perf_counter() - start < 0.5  # encoding the whole text takes many times longer


def test_health_answers_while_a_long_prompt_is_encoded(tokenizer):
    """A context long enough that a 200 kB prompt is encoded in full: /health is answered meanwhile (the
    encoding runs in a worker thread and releases the GIL)."""
    model = build_model(preset_config("debug", vocab_size=tokenizer.vocab_size, max_seq_len=1 << 19), seed=0)
    engine = Engine(model.eval(), tokenizer, max_batch_size=2, num_blocks=16, block_size=8)
    rng = random.Random(0)
    prompt = " ".join(rng.choice(["alpha", "zebra", "quartz", "x1y2"]) + str(rng.randint(0, 99))
                      for _ in range(200_000 // 8))
    with TestClient(create_app(engine, tokenizer, "tiny")) as client:
        answer = {}
        big = threading.Thread(target=lambda: answer.update(r=client.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 4})))
        big.start()
        latencies = []
        while big.is_alive():
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
        big.join()
    # Encoded in full and found to need more KV blocks than the cache has: refused after the work.
    assert answer["r"].status_code == 400 and answer["r"].json()["error"]["param"] == "max_tokens"
    assert len(latencies) >= 5 and max(latencies) < 0.5, latencies
