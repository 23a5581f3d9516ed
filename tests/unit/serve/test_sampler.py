"""The batched sampler: per-row parameters, exact support of top-k/top-p, seeded reproducibility that does
not depend on the batch, and log-probs of the untempered model distribution."""

import math

import pytest
import torch

from cybertron.errors import UserError
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingBatch, SamplingParams, make_generator, sample
from tests.unit.serve.serve_helpers import random_prompts


def _draws(logits, params, n):
    """n samples from one row of logits, each row of the batch with its own seed."""
    rows = logits.expand(n, -1)
    generators = [make_generator(seed) for seed in range(n)]
    return torch.tensor(sample(rows, SamplingBatch.build([params] * n, generators, "cpu")).tokens)


def test_temperature_zero_is_argmax_and_logprob_is_log_softmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    out = sample(logits, SamplingBatch.build([SamplingParams(temperature=0.0)] * 5, [None] * 5, "cpu"))
    assert out.tokens == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).gather(1, logits.argmax(-1, keepdim=True))[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)


def test_sampling_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (1.0, 0.5):
        draws = _draws(logits, SamplingParams(temperature=temperature), 4000)
        freq = torch.bincount(draws, minlength=4).float() / len(draws)
        expected = torch.softmax(logits[0] / temperature, -1)
        assert (freq - expected).abs().max() < 0.03  # ~4 standard errors at n = 4000


def test_top_k_restricts_the_support_to_the_k_most_likely():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1))
    draws = _draws(logits, SamplingParams(temperature=2.0, top_k=5), 3000)
    assert set(draws.tolist()) == set(logits[0].topk(5).indices.tolist())


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15, 0.05
    draws = _draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.75), 3000)
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.04  # renormalised over the kept mass
    # top_p below the largest probability keeps only the most likely token
    assert set(_draws(probs.log(), SamplingParams(top_p=0.2), 200).tolist()) == {1}


def test_returned_logprob_is_the_models_not_the_tempered_one():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.3, top_k=3, seed=s) for s in range(3)]
    out = sample(logits, SamplingBatch.build(params, [make_generator(p.seed) for p in params], "cpu"))
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(debug_model):
    prompt = random_prompts([9], seed=10)[0]
    mine = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16)
    alone = Engine(debug_model, num_blocks=16, block_size=4).generate([prompt], mine)[0]
    again = Engine(debug_model, num_blocks=16, block_size=4).generate([prompt], mine)[0]
    assert alone.token_ids == again.token_ids

    others = random_prompts([3, 20, 14, 6], seed=11)
    crowd = [SamplingParams(temperature=1.2, seed=s, max_tokens=10 + s) for s in range(3)]
    crowd.append(SamplingParams(temperature=0.0, max_tokens=5))
    engine = Engine(debug_model, max_batch_size=5, num_blocks=64, block_size=4)
    results = engine.generate(others[:2] + [prompt] + others[2:], crowd[:2] + [mine] + crowd[2:])
    assert results[2].token_ids == alone.token_ids

    other_seed = Engine(debug_model, num_blocks=16, block_size=4).generate(
        [prompt], SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16))[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("max_tokens", 0), ("top_logprobs", 21), ("stop", ("",)), ("stop", tuple("abcdefghijklmnopq")),
    ("stop", ("x" * 513,)), ("seed", 2**64), ("seed", -(2**63) - 1),
])
def test_out_of_range_parameters_are_user_errors_naming_the_field(field, value):
    with pytest.raises(UserError) as err:
        SamplingParams(**{field: value}).validate()
    assert err.value.param == field


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_every_seed_in_range_is_accepted_by_the_generator(seed):
    SamplingParams(seed=seed, stop=tuple("abcdefghijklmnop"), max_tokens=1).validate()  # 16 stops: the cap
    assert make_generator(seed).initial_seed() == seed % 2**64
