"""logit_bias and presence/frequency penalties (OpenAI's semantics): the adjusted logits against a direct
computation, greedy and sampled choices made from them, reported logprobs left as the model's, each request
of a batch with its own settings, and out-of-range values refused by name."""

import pytest
import torch

from cybertron.errors import UserError
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingBatch, SamplingParams, adjust_logits, make_generator, sample
from tests.unit.serve.serve_helpers import random_prompts


def _reference(logits, params, counts):
    """OpenAI's documented formula, one entry at a time."""
    out = logits.clone()
    for row, (p, seen) in enumerate(zip(params, counts)):
        for token, bias in p.logit_bias:
            out[row, token] += bias
        for token, count in (seen or {}).items():
            out[row, token] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    return out


def test_adjusted_logits_match_the_formula_and_logprobs_stay_the_models():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, logit_bias=((3, 5.0), (7, -100.0), (9, 1.5)), presence_penalty=0.7,
                             frequency_penalty=0.4),
              SamplingParams(temperature=0.0, frequency_penalty=-1.3),
              SamplingParams(temperature=0.0, presence_penalty=2.0, logit_bias=((4, 0.25),))]
    counts = [{3: 2, 11: 1}, {5: 4, 6: 1}, {4: 3, 0: 1}]  # token 3 of row 0 and 4 of row 2: bias and penalty
    batch = SamplingBatch.build(params, [None] * 3, "cpu", counts)
    expected = _reference(logits, params, counts)
    torch.testing.assert_close(adjust_logits(logits, batch), expected)
    out = sample(logits, batch)
    assert out.tokens == expected.argmax(-1).tolist()
    raw = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), raw)  # the model's, not the adjusted ones


def test_sampling_follows_the_biased_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, logit_bias=((3, 3.0), (0, -1.0)))
    n = 4000
    generators = [make_generator(seed) for seed in range(n)]
    draws = torch.tensor(sample(logits.expand(n, -1), SamplingBatch.build([params] * n, generators, "cpu")).tokens)
    freq = torch.bincount(draws, minlength=4).float() / n
    expected = torch.softmax(logits[0] + torch.tensor([-1.0, 0.0, 0.0, 3.0]), -1)
    assert (freq - expected).abs().max() < 0.03  # ~4 standard errors at n = 4000


def _penalized_greedy(model, prompt, n, params):
    """No cache: a full forward over everything so far, the formula applied to the raw logits, argmax."""
    tokens, counts = list(prompt), {}
    with torch.no_grad():
        for _ in range(n):
            logits = _reference(model(torch.tensor([tokens]))[0, -1:].float(), [params], [counts])
            token = int(logits.argmax())
            counts[token] = counts.get(token, 0) + 1
            tokens.append(token)
    return tokens[len(prompt):]


def test_a_strong_bias_forces_a_token_under_greedy_decoding(debug_model):
    prompt = random_prompts([7], seed=3)[0]
    plain = Engine(debug_model, num_blocks=16, block_size=4).generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=6))[0]
    forced = next(t for t in range(256) if t not in plain.token_ids)
    biased = Engine(debug_model, num_blocks=16, block_size=4).generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=6, logit_bias=((forced, 100.0),)))[0]
    assert biased.token_ids == [forced] * 6
    banned = Engine(debug_model, num_blocks=16, block_size=4).generate([prompt], SamplingParams(
        temperature=0.0, max_tokens=6, logit_bias=((plain.token_ids[0], -100.0),)))[0]
    assert plain.token_ids[0] not in banned.token_ids


def test_penalties_follow_the_formula_and_each_request_of_a_batch_gets_its_own(debug_model):
    prompt = random_prompts([5], seed=4)[0]
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    frequency = SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=2.0)
    presence = SamplingParams(temperature=0.0, max_tokens=24, presence_penalty=1.5, frequency_penalty=-0.5)
    engine = Engine(debug_model, max_batch_size=4, num_blocks=64, block_size=4)
    results = engine.generate([prompt] * 3, [plain, frequency, presence])  # one batch, three settings
    unpenalized = results[0].token_ids
    assert len(set(unpenalized)) < len(unpenalized)  # greedy decoding repeats tokens here...
    for result, params in zip(results[1:], (frequency, presence)):
        assert result.token_ids == _penalized_greedy(debug_model, prompt, 24, params)
    assert len(set(results[1].token_ids)) > len(set(unpenalized))  # ...which the frequency penalty curbs


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("frequency_penalty", float("nan")),
    ("logit_bias", ((5, 100.5),)), ("logit_bias", ((5, float("inf")),)), ("logit_bias", ((-1, 1.0),)),
    ("logit_bias", ((5, 1.0), (5, 2.0))), ("logit_bias", tuple((i, 1.0) for i in range(301))),
])
def test_out_of_range_adjustments_are_user_errors_naming_the_field(field, value):
    with pytest.raises(UserError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.param == field


def test_a_bias_on_a_token_outside_the_vocabulary_is_refused(debug_model):
    engine = Engine(debug_model, num_blocks=16, block_size=4)
    engine.check_request([1, 2], SamplingParams(logit_bias=tuple((i, 1.0) for i in range(256))))  # every token
    with pytest.raises(UserError) as err:
        engine.check_request([1, 2], SamplingParams(logit_bias=((256, 1.0),)))
    assert err.value.param == "logit_bias"


def test_a_preempted_request_keeps_counting_what_it_generated_before(debug_model):
    """Recomputation puts the output so far into the new prompt; the penalties must still count it."""
    prompts = random_prompts([10, 12, 9, 11], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=1.0, presence_penalty=0.5)
    engine = Engine(debug_model, max_batch_size=4, num_blocks=12, block_size=4)
    results = engine.generate(prompts, params)
    assert engine.stats.preemptions > 0
    assert [r.token_ids for r in results] == [_penalized_greedy(debug_model, p, 20, params) for p in prompts]
