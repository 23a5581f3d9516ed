"""The FastAPI app in-process: response shapes, choices, log-probs, chat templates and the API key.
(tests/e2e/test_serve.py drives a real server process with the official client.)"""

import json

import pytest
from fastapi.testclient import TestClient

from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.chat import ChatTemplateError, render_chat
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.server import create_app

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    return TextTokenizer(tokenizer.backend, eos_token=tokenizer.eos_token, chat_template=TEMPLATE)


@pytest.fixture
def client(text_model, chat_tokenizer):
    engine = Engine(text_model, chat_tokenizer, max_batch_size=8, num_blocks=64, block_size=8)
    with TestClient(create_app(engine, chat_tokenizer, "tiny", api_key="sekret")) as client:
        client.headers["Authorization"] = "Bearer sekret"
        client.engine = engine
        yield client


def test_chat_template_is_rendered_with_jinja(chat_tokenizer, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat(chat_tokenizer, messages) == \
        "<system>Be brief.<|endoftext|><user>Hi<|endoftext|><assistant>"
    assert render_chat(tokenizer, messages) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    strict = TextTokenizer(tokenizer.backend, eos_token=tokenizer.eos_token,
                           chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(ChatTemplateError, match="no system role"):
        render_chat(strict, messages)


def test_completion_choices_usage_and_logprobs(client, chat_tokenizer):
    body = {"model": "tiny", "prompt": ["Hello", "The quick brown"], "n": 2, "max_tokens": 5,
            "temperature": 0.0, "logprobs": 3, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "text_completion" and [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    prompts = [chat_tokenizer.encode("Hello"), chat_tokenizer.encode("The quick brown")]
    assert data["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 20,
                             "total_tokens": sum(map(len, prompts)) + 20}
    expected = Engine(client.engine.model, chat_tokenizer, num_blocks=16, block_size=8).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    for choice in data["choices"]:
        reference = expected[choice["index"] // 2]
        assert choice["text"] == reference.text and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"] == pytest.approx(reference.logprobs, abs=1e-5)
        assert len(logprobs["top_logprobs"]) == 5 and all(len(t) <= 3 for t in logprobs["top_logprobs"])
        assert "".join(logprobs["tokens"]) == choice["text"] or "\ufffd" in "".join(logprobs["tokens"])


def test_chat_stream_matches_non_streamed_reply(client, chat_tokenizer):
    body = {"messages": [{"role": "user", "content": "Hello world"}], "max_tokens": 12, "seed": 7,
            "temperature": 0.8, "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=body).json()
    prompt = chat_tokenizer.encode(render_chat(chat_tokenizer, body["messages"]))
    assert whole["usage"]["prompt_tokens"] == len(prompt)
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2
    with client.stream("POST", "/v1/chat/completions",
                       json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"


def test_api_key_is_required_on_v1_only(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    response = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    unauthenticated = client.post("/v1/completions", content="{not json", headers={"Authorization": ""})
    assert unauthenticated.status_code == 401  # checked before the body is even parsed
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200


def test_unsupported_fields_are_refused_not_ignored(client):
    for extra, param in [({"best_of": 3}, "best_of"), ({"echo": True}, "echo"),
                         ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs")]:
        response = client.post("/v1/completions", json={"prompt": "Hi", **extra})
        assert response.status_code == 400, extra
        assert response.json()["error"]["param"] == param
    assert client.engine.cache.num_free_blocks == client.engine.cache.num_total_blocks


def test_logit_bias_and_penalties_reach_the_sampler(client, chat_tokenizer):
    prompt = chat_tokenizer.encode("Hello")
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    forced = client.post("/v1/completions", json={**body, "logit_bias": {"42": 100}}).json()
    assert forced["choices"][0]["text"] == chat_tokenizer.decode([42] * 8)
    plain = client.post("/v1/completions", json=body).json()
    penalized = client.post("/v1/completions", json={**body, "frequency_penalty": 1.5, "presence_penalty": -0.5,
                                                     "logit_bias": {"7": -3.5}}).json()
    expected = Engine(client.engine.model, chat_tokenizer, num_blocks=16, block_size=8).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, frequency_penalty=1.5,
                                 presence_penalty=-0.5, logit_bias=((7, -3.5),)))[0]
    assert penalized["choices"][0]["text"] == expected.text != plain["choices"][0]["text"]


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"fox": 1}}, "logit_bias"), ({"logit_bias": {"-3": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias"), ({"logit_bias": {"320": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"), ({"logit_bias": {"5": "up"}}, "logit_bias.5"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.1}, "frequency_penalty"),
])
def test_out_of_range_adjustments_are_400_naming_the_field(client, extra, param):
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
