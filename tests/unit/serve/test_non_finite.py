"""Non-finite logits fail only their own request: the sampler flags the row, the engine ends that request
with an error (zeroing the KV blocks it poisoned) and every other request is generated exactly as alone."""

import copy
import json
import math

import pytest
import torch

from cybertron.serve.engine import Engine, GenerationError
from cybertron.serve.sampling import SamplingBatch, SamplingParams, make_generator, sample
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def test_sampler_flags_broken_rows_and_samples_the_others_as_alone():
    torch.manual_seed(0)
    healthy = torch.randn(2, 50)
    nan, pos_inf, all_neg_inf = torch.randn(50), torch.randn(50), torch.full((50,), -math.inf)
    nan[7], pos_inf[3] = math.nan, math.inf
    partly_masked = healthy[1].clone()
    partly_masked[:25] = -math.inf  # a legitimate mask: still a distribution
    logits = torch.stack([healthy[0], nan, pos_inf, all_neg_inf, partly_masked])
    params = [SamplingParams(temperature=0.9, seed=i, top_logprobs=2) for i in range(5)]
    out = sample(logits, SamplingBatch.build(params, [make_generator(p.seed) for p in params], "cpu"))
    assert out.finite == [True, False, False, False, True]
    for row in (0, 4):
        alone = sample(logits[row:row + 1], SamplingBatch.build([params[row]], [make_generator(row)], "cpu"))
        assert out.tokens[row] == alone.tokens[0] and out.logprobs[row] == pytest.approx(alone.logprobs[0])
        assert [t for t, _ in out.top_logprobs[row]] == [t for t, _ in alone.top_logprobs[0]]
        assert math.isfinite(out.logprobs[row])


@pytest.fixture(scope="module")
def poisoned(debug_model):
    """The debug model with one NaN in the embedding row of a token the healthy prompts never reach: any
    sequence holding that token gets NaN hidden states, NaN keys/values in its KV blocks and NaN logits."""
    healthy = random_prompts([6, 11, 9], seed=3)
    references = [greedy_reference(debug_model, p, GREEDY.max_tokens) for p in healthy]
    seen = {t for p, r in zip(healthy, references) for t in p + r}
    poison = next(t for t in range(debug_model.config.vocab_size) if t not in seen)
    model = copy.deepcopy(debug_model)
    with torch.no_grad():
        model.embed_tokens.weight[poison, 5] = math.nan
    return model, poison, healthy, references


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static-buckets"])
def test_a_nan_request_fails_alone_and_poisons_no_later_request(poisoned, static_decode):
    model, poison, healthy, references = poisoned
    engine = Engine(model, max_batch_size=4, num_blocks=12, block_size=4, decode_graphs=static_decode)
    outputs = {}

    def add(name, prompt):
        outputs[name] = []
        engine.add_request(prompt, GREEDY, on_output=outputs[name].append)

    add("healthy", healthy[0])
    engine.step()  # the healthy request is decoding when the broken one joins
    add("broken", [3, poison, 9])
    while engine.has_unfinished():
        engine.step()
    broken = outputs["broken"]
    assert len(broken) == 1 and broken[0].finished and broken[0].finish_reason == "error"
    assert "non-finite logits" in broken[0].error and broken[0].token_ids == []
    assert [t for o in outputs["healthy"] for t in o.token_ids] == references[0]
    # The freed blocks held NaN keys; two requests decoding together (the gathered, masked attention path)
    # now reuse them and must be unaffected.
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks
    results = engine.generate(healthy[1:], GREEDY)
    assert [r.token_ids for r in results] == references[1:]


def test_offline_generate_raises_one_clear_error(poisoned):
    model, poison, healthy, _ = poisoned
    engine = Engine(model, max_batch_size=4, num_blocks=16, block_size=4)
    with pytest.raises(GenerationError, match="prompt 1: the model produced non-finite logits"):
        engine.generate([healthy[0], [poison]], GREEDY)
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


def test_the_server_answers_a_broken_request_with_an_error_and_keeps_serving(text_model, tokenizer):
    from fastapi.testclient import TestClient

    from cybertron.serve.server import create_app

    healthy = tokenizer.encode("The quick brown fox")
    reference = greedy_reference(text_model, healthy, 6)
    poison = next(t for t in range(tokenizer.vocab_size) if t not in healthy + reference
                  and t != tokenizer.eos_id)
    model = copy.deepcopy(text_model)
    with torch.no_grad():
        model.embed_tokens.weight[poison] = math.nan
    engine = Engine(model, tokenizer, max_batch_size=4, num_blocks=32, block_size=8)
    broken = {"prompt": [5, poison], "max_tokens": 6, "temperature": 0.0}
    with TestClient(create_app(engine, tokenizer, "tiny")) as client:
        response = client.post("/v1/completions", json=broken)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "non_finite_logits" and "non-finite logits" in error["message"]
        with client.stream("POST", "/v1/completions", json={**broken, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200  # the stream had started: the error comes as an event
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "non_finite_logits"
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"prompt": healthy, "max_tokens": 6, "temperature": 0.0,
                                                  "ignore_eos": True})
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["text"] == tokenizer.decode(reference, skip_special_tokens=True)
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks
