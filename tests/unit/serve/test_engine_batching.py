"""Continuous batching: paged greedy decoding equals full recomputation, batching changes nothing, log-probs
are the model's, and every block comes back."""

import pytest
import torch

from cybertron.errors import UserError
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static-buckets"])
def test_greedy_with_paged_cache_equals_full_recompute(debug_model, static_decode):
    """static-buckets: the padded, CUDA-graph-shaped decode path (run eagerly on CPU)."""
    prompts = random_prompts([1, 4, 5, 13])  # block size 4: prompts end before, on and after a boundary
    engine = Engine(debug_model, max_batch_size=4, num_blocks=32, block_size=4, decode_graphs=static_decode)
    results = engine.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_reference(debug_model, prompt, 12)
        assert result.finish_reason == "length"
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "static-buckets"])
def test_sixteen_concurrent_requests_equal_one_at_a_time(debug_model, static_decode):
    lengths = [3, 17, 1, 30, 8, 12, 5, 22, 9, 2, 15, 27, 6, 11, 19, 4]
    prompts = random_prompts(lengths, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + (i * 7) % 13) for i in range(16)]
    alone = []
    for prompt, p in zip(prompts, params):
        solo = Engine(debug_model, max_batch_size=1, num_blocks=16, block_size=8)
        alone.append(solo.generate([prompt], p)[0].token_ids)

    engine = Engine(debug_model, max_batch_size=16, num_blocks=64, block_size=8, decode_graphs=static_decode)
    outputs = {}
    ids = [engine.add_request(prompts[i], params[i], on_output=_collector(outputs, i)) for i in range(8)]
    for _ in range(3):  # the first half is mid-generation when the second half joins
        engine.step()
    ids += [engine.add_request(prompts[i], params[i], on_output=_collector(outputs, i)) for i in range(8, 16)]
    assert len(set(ids)) == 16
    while engine.has_unfinished():
        engine.step()
    assert [outputs[i] for i in range(16)] == alone
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


def _collector(outputs, index):
    def collect(output):
        outputs.setdefault(index, []).extend(output.token_ids)
    return collect


def test_preempted_requests_resume_with_the_same_tokens(debug_model):
    """A pool too small for all requests at once: the newest are preempted and recomputed later."""
    prompts = random_prompts([10, 12, 9, 11], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    expected = [greedy_reference(debug_model, p, 20) for p in prompts]
    engine = Engine(debug_model, max_batch_size=4, num_blocks=12, block_size=4)
    results = engine.generate(prompts, params)
    assert engine.stats.preemptions > 0
    assert [r.token_ids for r in results] == expected
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


def test_logprobs_equal_log_softmax_of_the_full_sequence(debug_model):
    prompts = random_prompts([7, 20], seed=3)
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=5, max_tokens=15),
              SamplingParams(temperature=0.0, max_tokens=15)]
    engine = Engine(debug_model, max_batch_size=2, num_blocks=32, block_size=4)
    for prompt, result in zip(prompts, engine.generate(prompts, params)):
        sequence = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(debug_model(sequence).float(), dim=-1)[0]
        n = len(prompt)
        expected = logprobs[n - 1:-1].gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-5, rtol=0)


def test_top_logprobs_are_the_model_distributions_best(debug_model):
    engine = Engine(debug_model, num_blocks=16, block_size=8)
    prompt = random_prompts([6], seed=4)[0]
    result = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3, top_logprobs=4))[0]
    with torch.no_grad():
        first = torch.log_softmax(debug_model(torch.tensor([prompt]))[0, -1], dim=-1)
    values, ids = first.topk(4)
    assert [t for t, _ in result.top_logprobs[0]] == ids.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in result.top_logprobs[0]]), values)
    assert result.top_logprobs[0][0][0] == result.token_ids[0]  # greedy picks the best one


def test_stop_token_ends_generation_and_is_returned(debug_model):
    prompt = random_prompts([5], seed=6)[0]
    free_run = greedy_reference(debug_model, prompt, 10)
    stop_at = free_run[4]
    first = free_run.index(stop_at)
    engine = Engine(debug_model, num_blocks=16, block_size=8)
    result = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10,
                                                      stop_token_ids=(stop_at,)))[0]
    assert result.token_ids == free_run[:first + 1]
    assert result.finish_reason == "stop"


def test_cancel_frees_blocks_and_tells_the_consumer(debug_model):
    engine = Engine(debug_model, num_blocks=16, block_size=4)
    seen = []
    running = engine.add_request(random_prompts([9])[0], SamplingParams(temperature=0.0, max_tokens=50),
                                 on_output=seen.append)
    waiting = engine.add_request([1, 2, 3], GREEDY)
    engine.step()
    engine.step()
    assert engine.cache.num_free_blocks < engine.cache.num_total_blocks
    assert engine.cancel(running) and engine.cancel(waiting)
    assert not engine.cancel(running)  # already gone
    assert seen[-1].finished and seen[-1].finish_reason == "cancelled"
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks
    assert not engine.has_unfinished()


def test_closing_a_stream_early_cancels_its_request(debug_model):
    engine = Engine(debug_model, num_blocks=16, block_size=4)
    stream = engine.stream([4, 5, 6], SamplingParams(temperature=0.0, max_tokens=40))
    next(stream), next(stream)
    stream.close()
    assert engine.stats.requests_cancelled == 1
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


@pytest.mark.parametrize("prompt_len, max_tokens, param", [
    (0, 1, "prompt"),  # empty
    (256, 1, "prompt"),  # the whole context: no room for a single new token
    (200, 57, "max_tokens"),  # 200 + 57 > 256
])
def test_requests_beyond_the_context_are_user_errors(debug_model, prompt_len, max_tokens, param):
    engine = Engine(debug_model, num_blocks=64, block_size=16)
    with pytest.raises(UserError) as err:
        engine.add_request([1] * prompt_len, SamplingParams(max_tokens=max_tokens))
    assert err.value.param == param
    assert not engine.has_unfinished()


def test_out_of_vocabulary_tokens_and_oversized_requests_are_user_errors(debug_model):
    engine = Engine(debug_model, num_blocks=4, block_size=16)
    with pytest.raises(UserError, match="token ids"):
        engine.add_request([1, 256], GREEDY)
    with pytest.raises(UserError, match="KV cache blocks"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=10))  # 5 blocks, the pool has 4
    engine.add_request([1] * 60, SamplingParams(max_tokens=4))  # exactly 4 blocks fits


def test_decode_is_split_to_bound_the_gathered_keys(debug_model):
    prompts = random_prompts([40, 3, 25, 8, 31, 2], seed=7)
    engine = Engine(debug_model, max_batch_size=6, num_blocks=64, block_size=4, max_attention_keys=64)
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    engine.step()  # prefill all six
    groups = engine._decode_groups(engine.running)
    assert len(groups) > 1 and all(len(g) * max(len(r.tokens) for r in g) <= 64 or len(g) == 1 for g in groups)
    assert sorted(r.id for g in groups for r in g) == sorted(r.id for r in engine.running)
    while engine.has_unfinished():
        engine.step()
    fresh = Engine(debug_model, max_batch_size=6, num_blocks=64, block_size=4, max_attention_keys=64)
    results = fresh.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
    assert [r.token_ids for r in results] == [greedy_reference(debug_model, p, 6) for p in prompts]


def test_prefill_takes_the_last_prompt_logits_through_the_model_call(debug_model):
    """logits_at picks one position per row, and the engine's prefill goes through model() (its hooks fire:
    what FSDP2 needs to gather the embedding and head), not through its methods."""
    tokens = torch.tensor(random_prompts([6, 6], seed=4))
    last = torch.tensor([5, 2])
    with torch.no_grad():
        full = debug_model(tokens)
        torch.testing.assert_close(debug_model(tokens, logits_at=last), full[torch.arange(2), last])
    calls = []
    hook = debug_model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    try:
        Engine(debug_model, max_batch_size=2, num_blocks=8, block_size=8).generate(
            random_prompts([3, 5]), SamplingParams(temperature=0.0, max_tokens=2))
    finally:
        hook.remove()
    assert calls == [torch.Size([2, 5]), torch.Size([2, 1])]  # one prefill of both prompts, one decode
