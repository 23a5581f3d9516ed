"""The background step loop: concurrent asyncio consumers, cancellation by leaving the stream, and an engine
failure that fails only the requests in flight."""

import asyncio
from contextlib import aclosing

import pytest

from cybertron.serve.async_engine import AsyncEngine, EngineFailure
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from tests.unit.serve.serve_helpers import random_prompts


@pytest.fixture
def runner(debug_model):
    runner = AsyncEngine(Engine(debug_model, max_batch_size=8, num_blocks=64, block_size=4))
    runner.start()
    yield runner
    runner.stop()


async def _settled(engine, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if not engine.has_unfinished() and engine.cache.num_free_blocks == engine.cache.num_total_blocks:
            return True
        await asyncio.sleep(0.01)
    return False


def test_concurrent_streams_match_the_synchronous_engine(runner, debug_model):
    prompts = random_prompts([4, 11, 7, 2, 16], seed=20)
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i) for i in range(5)]
    expected = Engine(debug_model, num_blocks=64, block_size=4).generate(prompts, params)

    async def consume(prompt, p):
        return [t async for out in runner.stream(prompt, p) for t in out.token_ids]

    async def main():
        return await asyncio.gather(*(consume(pr, p) for pr, p in zip(prompts, params)))

    assert asyncio.run(main()) == [r.token_ids for r in expected]


def test_leaving_a_stream_cancels_the_request_and_frees_its_blocks(runner):
    async def main():
        async with aclosing(runner.stream([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=200))) as s:
            async for _ in s:
                break
        return await _settled(runner.engine)

    assert asyncio.run(main())
    assert runner.engine.stats.requests_cancelled == 1


def test_a_failing_step_fails_the_requests_in_flight_and_keeps_serving(runner, monkeypatch):
    engine = runner.engine
    forward = engine.model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device error")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", flaky)

    async def main():
        with pytest.raises(EngineFailure, match="simulated device error"):
            async for _ in runner.stream([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20)):
                pass
        assert await _settled(engine)
        return [out async for out in runner.stream([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))]

    outputs = asyncio.run(main())
    assert outputs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outputs) == 4
    assert runner.failures == 1 and runner.is_running
