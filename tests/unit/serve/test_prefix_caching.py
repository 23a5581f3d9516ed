"""The engine with the prefix cache and chunked prefill: greedy output equals a cache-free recomputation with
either on or off, shared blocks survive preemption and cancellation, and every reference comes back."""

import copy
import math

import pytest
import torch

from cybertron.serve.async_engine import AsyncEngine
from cybertron.serve.engine import Engine
from cybertron.serve.metrics import render_metrics
from cybertron.serve.sampling import SamplingParams
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _all_free(engine):
    blocks = engine.blocks
    return (engine.cache.num_free_blocks == engine.cache.num_total_blocks and engine.cache.tables == {}
            and all(blocks.ref_count(b) == 0 for b in range(1, blocks.num_total + 1)))


def _collector(tokens):
    return lambda output: tokens.extend(output.token_ids)


def _shared_prefix_prompts():
    """Prompts sharing a 13-token prefix (three full blocks of 4), two of them identical."""
    system = random_prompts([13], seed=11)[0]
    tails = random_prompts([1, 6, 6, 9], seed=12)
    return [system + tails[0], system + tails[1], system + tails[1], system + tails[3], system[:9]]


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static-buckets"])
def test_greedy_with_prefix_caching_equals_without_and_full_recompute(debug_model, static_decode):
    prompts = _shared_prefix_prompts()
    expected = [greedy_reference(debug_model, p, GREEDY.max_tokens) for p in prompts]
    results = {}
    for caching in (True, False):
        engine = Engine(debug_model, max_batch_size=8, num_blocks=48, block_size=4, decode_graphs=static_decode,
                        prefix_caching=caching)
        first = engine.generate(prompts, GREEDY)
        again = engine.generate(prompts[::-1], GREEDY)[::-1]  # everything but the last tokens now cached
        results[caching] = ([r.token_ids for r in first], [r.token_ids for r in again], engine.stats)
        assert _all_free(engine)
    on, off = results[True], results[False]
    assert on[0] == on[1] == off[0] == off[1] == expected
    assert off[2].prefix_hit_tokens == 0 and on[2].prefix_hit_tokens > 0
    assert on[2].prefill_tokens + on[2].prefix_hit_tokens == off[2].prefill_tokens
    assert on[2].prefill_tokens < off[2].prefill_tokens // 2


def test_chunked_prefill_equals_unchunked_while_others_decode(debug_model):
    prompts = random_prompts([3, 5, 90], seed=13)
    expected = [greedy_reference(debug_model, p, 12) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    for chunked in (True, False):
        engine = Engine(debug_model, max_batch_size=4, num_blocks=64, block_size=4, max_prefill_tokens=16,
                        chunked_prefill=chunked, prefix_caching=False)
        outputs = {i: [] for i in range(3)}
        for i in range(2):
            engine.add_request(prompts[i], params, on_output=_collector(outputs[i]))
        engine.step()
        engine.add_request(prompts[2], params, on_output=_collector(outputs[2]))
        steps = 0
        while not outputs[2]:  # the long prompt's prefill: the two streams gain a token every step
            engine.step()
            steps += 1
            assert len(outputs[0]) == len(outputs[1]) == 1 + steps
        assert steps == (math.ceil(90 / 14) if chunked else 1)  # 16 tokens a step less the two decode rows
        while engine.has_unfinished():
            engine.step()
        assert [outputs[i] for i in range(3)] == expected
        assert _all_free(engine)


def test_preemption_with_shared_blocks_resumes_with_the_same_tokens(debug_model):
    """A pool too small for the group: the newest copies are preempted while sharing the prompt's blocks,
    and recomputed later from the cache."""
    prompt = random_prompts([14], seed=14)[0]
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=20) for i in range(4)]
    roomy = Engine(debug_model, max_batch_size=4, num_blocks=64, block_size=4, prefix_caching=False)
    expected = [r.token_ids for r in roomy.generate([prompt] * 4, params)]
    engine = Engine(debug_model, max_batch_size=4, num_blocks=14, block_size=4)
    results = engine.generate([prompt] * 4, params)
    assert engine.stats.preemptions > 0 and engine.stats.prefix_hit_tokens > 0
    assert [r.token_ids for r in results] == expected
    assert _all_free(engine)


def test_cancelling_one_sharer_leaves_the_others_and_frees_everything(debug_model):
    prompt = random_prompts([11], seed=15)[0]
    expected = greedy_reference(debug_model, prompt, 10)
    engine = Engine(debug_model, max_batch_size=4, num_blocks=32, block_size=4)
    outputs = {i: [] for i in range(3)}
    ids = [engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=10),
                              on_output=_collector(outputs[i])) for i in range(3)]
    for _ in range(3):
        engine.step()
    assert engine.stats.prefix_hit_tokens == 2 * 8
    assert engine.cancel(ids[1])
    while engine.has_unfinished():
        engine.step()
    assert outputs[0] == outputs[2] == expected
    assert _all_free(engine)


def test_a_failing_request_caches_none_of_its_blocks(debug_model):
    prompt = random_prompts([10], seed=16)[0]
    poison = next(t for t in range(256) if t not in prompt)
    model = copy.deepcopy(debug_model)
    with torch.no_grad():
        model.embed_tokens.weight[poison, 3] = math.nan
    engine = Engine(model, max_batch_size=4, num_blocks=32, block_size=4)
    outputs = []
    engine.add_request(prompt[:5] + [poison] + prompt[5:], GREEDY, on_output=outputs.append)
    while engine.has_unfinished():
        engine.step()
    assert outputs[-1].finish_reason == "error"
    assert engine.blocks.num_cached == 0 and _all_free(engine)
    engine.generate([prompt], GREEDY)
    # A healthy request's full blocks are cached as usual: all but the last sampled token have KV.
    assert engine.blocks.num_cached == (10 + GREEDY.max_tokens - 1) // 4


def test_metrics_expose_prefix_hits_and_prefill_tokens(debug_model):
    engine = Engine(debug_model, max_batch_size=4, num_blocks=32, block_size=4)
    prompt = random_prompts([10], seed=17)[0]
    engine.generate([prompt], GREEDY)
    engine.generate([prompt], GREEDY)  # two of its blocks come from the cache: 8 tokens hit, 2 prefilled
    text = render_metrics(AsyncEngine(engine), {"http_requests": 0, "http_errors": 0})
    values = {line.split()[0]: int(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["cybertron_prefix_cache_hit_tokens_total"] == 8
    assert values["cybertron_prefill_tokens_total"] == 10 + 2
    assert values["cybertron_kv_blocks_cached"] == engine.blocks.num_cached > 0
    assert values["cybertron_kv_blocks_used"] == 0


def test_a_group_of_identical_prompts_is_prefilled_once(debug_model):
    """GRPO's case: group_size copies of a prompt in one generate call. The first copy is prefilled; the
    others wait one step for its blocks and then compute only the last partial block."""
    prompt = random_prompts([14], seed=18)[0]
    engine = Engine(debug_model, max_batch_size=8, num_blocks=32, block_size=4)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=4) for i in range(4)]
    results = engine.generate([prompt] * 4, params)
    assert engine.stats.prefix_hit_tokens == 3 * 12 and engine.stats.prefill_tokens == 14 + 3 * 2
    alone = Engine(debug_model, max_batch_size=8, num_blocks=32, block_size=4, prefix_caching=False)
    assert [r.token_ids for r in results] == [r.token_ids for r in alone.generate([prompt] * 4, params)]
