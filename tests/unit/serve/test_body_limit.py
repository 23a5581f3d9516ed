"""server.max_body_bytes: a body up to the limit is served, one byte more is 413, with or without a declared
Content-Length (a chunked body is counted as it arrives)."""

import json

import pytest
from fastapi.testclient import TestClient

from cybertron.serve.engine import Engine
from cybertron.serve.server import create_app

LIMIT = 300


@pytest.fixture
def client(text_model, tokenizer):
    engine = Engine(text_model, tokenizer, max_batch_size=2, num_blocks=16, block_size=8)
    with TestClient(create_app(engine, tokenizer, "tiny", max_body_bytes=LIMIT)) as client:
        yield client


def body_of(size):
    body = {"prompt": "", "max_tokens": 1}
    body["prompt"] = ("The quick brown fox jumps over the lazy dog. " * 10)[:size - len(json.dumps(body))]
    data = json.dumps(body).encode()
    assert len(data) == size
    return data


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_the_limit_is_exact(client, chunked):
    headers = {"Content-Type": "application/json"}
    for size, status in ((LIMIT, 200), (LIMIT + 1, 413)):
        data = body_of(size)
        content = iter([data[:100], data[100:]]) if chunked else data
        response = client.post("/v1/completions", content=content, headers=headers)
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
