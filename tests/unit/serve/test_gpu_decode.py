"""CUDA only: decode steps captured as CUDA graphs give the eager results, and a decode step launches its
work without waiting for the device (the step's one read-back is the sampled tokens)."""

import pytest
import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingBatch, SamplingParams
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_model():
    return build_model(preset_config("debug"), device="cuda", seed=0).eval()


def test_graphed_decode_matches_eager_decode(cuda_model):
    prompts = random_prompts([3, 17, 40, 9, 1], seed=30)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    eager = Engine(cuda_model, max_batch_size=8, num_blocks=64, block_size=16, decode_graphs=False)
    graphed = Engine(cuda_model, max_batch_size=8, num_blocks=64, block_size=16, decode_graphs=True)
    assert graphed.decode_graphs is not None and graphed.decode_graphs.capture
    for a, b in zip(eager.generate(prompts, params), graphed.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert graphed.cache.num_free_blocks == graphed.cache.num_total_blocks


def test_greedy_on_cuda_equals_full_recompute(cuda_model):
    prompts = random_prompts([5, 33], seed=31)
    engine = Engine(cuda_model, max_batch_size=4, num_blocks=32, block_size=16)
    for prompt, result in zip(prompts, engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))):
        assert result.token_ids == greedy_reference(cuda_model, prompt, 16)


def test_seeded_sampling_on_cuda_is_reproducible(cuda_model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=20)
    runs = [Engine(cuda_model, num_blocks=16, block_size=16).generate([[1, 2, 3]], params)[0].token_ids
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_decode_step_does_not_synchronise_before_the_read_back(cuda_model):
    engine = Engine(cuda_model, max_batch_size=4, num_blocks=32, block_size=16)
    for prompt in random_prompts([4, 7], seed=32):
        engine.add_request(prompt, SamplingParams(temperature=0.7, seed=1, max_tokens=30))
    for _ in range(3):  # prefill, then decode steps that capture the graph of this bucket
        engine.step()
    requests = list(engine.running)
    assert engine.scheduler.schedule().decode == requests  # reserves each one's room for its next token
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.inference_mode():
            SamplingBatch.build([r.params for r in requests], [r.generator for r in requests], engine.device)
            engine.runner.decode([r.id for r in requests], [r.tokens[-1] for r in requests],
                                 [len(r.tokens) - 1 for r in requests])
    finally:
        torch.cuda.set_sync_debug_mode("default")
