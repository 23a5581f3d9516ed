"""The OpenAI app over a speculating engine: several tokens per step stream as the same text, log-probs and
usage as without speculation."""

import json

import pytest
from fastapi.testclient import TestClient

from cybertron.serve.engine import Engine
from cybertron.serve.server import create_app
from cybertron.serve.speculative import SpeculativeConfig


@pytest.mark.parametrize("stream", [False, True])
def test_completions_through_a_speculating_engine_equal_plain_ones(text_model, tokenizer, stream):
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 14, "temperature": 0.0,
            "logprobs": 0, "ignore_eos": True}
    replies = {}
    for name, spec in [("plain", None), ("draft", SpeculativeConfig("draft", k=4, draft=text_model))]:
        engine = Engine(text_model, tokenizer, max_batch_size=4, num_blocks=32, block_size=8, speculative=spec)
        with TestClient(create_app(engine, tokenizer, "tiny")) as client:
            if stream:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                    lines = [line for line in response.iter_lines() if line and line != "data: [DONE]"]
                chunks = [json.loads(line.removeprefix("data: "))["choices"] for line in lines]
                replies[name] = ("".join(c[0]["text"] for c in chunks if c),
                                 [lp for c in chunks if c and c[0]["logprobs"] for lp in
                                  c[0]["logprobs"]["token_logprobs"]])
            else:
                data = client.post("/v1/completions", json=body).json()
                replies[name] = (data["choices"][0]["text"], data["choices"][0]["logprobs"]["token_logprobs"],
                                 data["usage"])
            metrics = client.get("/metrics").text
        if spec is not None:
            stats = engine.speculator.stats
            assert stats.emitted > stats.steps  # several tokens per step
            assert f"cybertron_spec_accepted_tokens_total {stats.accepted}\n" in metrics and stats.accepted > 0
        else:
            assert "cybertron_spec_" not in metrics
    assert replies["draft"][0] == replies["plain"][0] and len(replies["plain"][0]) > 5
    assert replies["draft"][1] == pytest.approx(replies["plain"][1], abs=1e-5)
    assert len(replies["draft"][1]) == 14
    assert replies["draft"][2:] == replies["plain"][2:]
