"""CUDA only: a mixed batch of LoRA adapters decoded through captured CUDA graphs (the rows' adapter slots a
static input) gives each adapter's greedy tokens, as eager decoding does."""

import copy

import pytest
import torch

from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts
from tests.unit.serve.test_multi_lora import adapters  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("path", ["auto", "gather"])
def test_graphed_mixed_adapter_decode_matches_eager_and_merged(debug_model, adapters, path):  # noqa: F811
    names = [None, "a", "b", "d", "a", None, "d"]
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 10], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        engine = Engine(copy.deepcopy(debug_model).cuda(), max_batch_size=8, num_blocks=64, block_size=16,
                        adapters=[adapter for adapter, _ in adapters.values()], decode_graphs=graphs)
        engine.lora.path = path
        assert (engine.decode_graphs is not None and engine.decode_graphs.capture) == graphs
        results[graphs] = engine.generate(prompts, params, names)
    for prompt, name, eager, graphed in zip(prompts, names, results[False], results[True]):
        assert eager.token_ids == graphed.token_ids, name
        reference = debug_model if name is None else adapters[name][1]  # on the CPU: its first tokens agree
        assert graphed.token_ids[:8] == greedy_reference(reference, prompt, 8), name
