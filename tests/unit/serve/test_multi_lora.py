"""Several LoRA/DoRA adapters in one batch (serve/multi_lora.py): each row's output is what that row's adapter,
merged into the base's weights and run alone, gives (finetune/lora.py's merge is the independent reference)."""

import copy

import pytest
import torch

from cybertron.errors import UserError
from cybertron.finetune.lora import LoRASpec, apply_lora, lora_modules, merge_lora_
from cybertron.runs import adapter_from_model
from cybertron.serve.engine import Engine
from cybertron.serve.multi_lora import LoraAdapter, LoraLayer, MultiLoRALinear, attach_adapters
from cybertron.serve.sampling import InvalidParameter, SamplingParams
from tests.unit.serve.serve_helpers import greedy_reference, random_prompts

# Different ranks, scales and targets (the output head included, which sees (B, dim) rows at prefill), and DoRA.
SPECS = {
    "a": LoRASpec(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"]),
    "b": LoRASpec(rank=8, alpha=4.0, targets=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"]),
    "d": LoRASpec(rank=2, alpha=2.0, targets=["v_proj", "o_proj", "up_proj"], dora=True),
}


def _trained(base, spec, seed):
    """`base` with adapters of `spec` whose B (and DoRA magnitude) are random, as training would leave them."""
    model = copy.deepcopy(base)
    apply_lora(model, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0.0, 0.3, generator=gen)
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.3 * torch.rand(m.magnitude.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def adapters(debug_model):
    """{name: (LoraAdapter, the adapter merged into a plain copy of the base)}."""
    out = {}
    for seed, (name, spec) in enumerate(SPECS.items(), start=1):
        trained = _trained(debug_model, spec, seed)
        out[name] = (adapter_from_model(name, trained), merge_lora_(copy.deepcopy(trained)).eval())
    return out


@pytest.mark.parametrize("path", ["gather", "dense"])
def test_each_row_of_a_mixed_batch_matches_its_adapter_merged_and_run_alone(debug_model, adapters, path):
    served = copy.deepcopy(debug_model)
    lora = attach_adapters(served, [adapter for adapter, _ in adapters.values()], path=path)
    assert sum(isinstance(m, MultiLoRALinear) for m in served.modules()) == 4 * 7 + 1
    refs = [debug_model] + [merged for _, merged in adapters.values()]
    slots = [0, 1, 2, 3, 2, 0, 1]
    tokens = torch.randint(0, 256, (len(slots), 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.select(slots)
        assert lora.rows.path == path
        mixed = served(tokens)
        for row, slot in enumerate(slots):
            alone = refs[slot](tokens[row:row + 1])[0]
            assert (mixed[row] - alone).abs().max() <= 1e-5, (row, slot)
            if slot:  # and the adapter does change the output
                assert (alone - debug_model(tokens[row:row + 1])[0]).abs().max() > 1e-2
        lora.select([0] * len(slots))  # no adapter in the call: the plain Linears, bit for bit
        assert lora.rows.index is None and torch.equal(served(tokens), debug_model(tokens))


# auto: dense for calls of more rows than adapters. graphs: decode through DecodeGraphs' static, padded path (what
# CUDA captures), where the rows' adapter slots are a column of the static input.
@pytest.mark.parametrize("path, graphs", [("auto", False), ("gather", False), ("auto", True), ("gather", True)])
def test_engine_decodes_a_mixed_batch_with_each_adapters_greedy_tokens(debug_model, adapters, path, graphs):
    engine = Engine(copy.deepcopy(debug_model), max_batch_size=8, num_blocks=64, block_size=8,
                    adapters=[adapter for adapter, _ in adapters.values()], decode_graphs=graphs)
    engine.lora.path = path
    assert engine.adapter_names == ["a", "b", "d"] and (engine.decode_graphs is not None) == graphs
    names = [None, "a", "b", "d", "a", None, "d"]
    prompts = random_prompts([5, 9, 3, 12, 7, 4, 10], seed=3)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), names)
    for prompt, name, result in zip(prompts, names, results):
        reference = debug_model if name is None else adapters[name][1]
        assert result.token_ids == greedy_reference(reference, prompt, 8), name
    assert len({tuple(r.token_ids) for r in results[:4]}) == 4  # the adapters did differ
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks  # every block freed


def test_an_unknown_adapter_is_refused(debug_model, adapters):
    adapter = adapters["a"][0]
    engine = Engine(copy.deepcopy(debug_model), num_blocks=16, adapters=[adapter])
    with pytest.raises(InvalidParameter, match="no adapter named 'nope'.*adapters: a") as err:
        engine.add_request([1, 2, 3], adapter="nope")
    assert err.value.param == "model" and err.value.code == "model_not_found"


def test_adapters_for_another_model_are_refused_in_one_line(debug_model, adapters):
    good = adapters["a"][0]
    q = good.layers["layers.0.self_attn.q_proj"]
    wrong_rank_in = LoraAdapter("x", {"layers.0.self_attn.q_proj": LoraLayer(q.a[:, :32], q.b)})
    missing = LoraAdapter("y", {"layers.9.self_attn.q_proj": q})
    for adapter, message in [(wrong_rank_in, r"'x': layers.0.self_attn.q_proj A has shape \(4, 32\) but the base "
                                             r"needs \(4, 64\)"),
                             (missing, "'y' adapts layers.9.self_attn.q_proj, which is not a linear layer"),
                             (LoraAdapter("a", {}), "unique")]:
        with pytest.raises(UserError, match=message) as err:
            attach_adapters(copy.deepcopy(debug_model), [good, adapter])
        assert "\n" not in str(err.value)


def test_the_prefix_cache_shares_kv_within_an_adapter_never_across(debug_model, adapters):
    """A prompt cached under one adapter is a miss for the base and the other adapters (their KV differs), and
    a hit for the same adapter; every answer stays that adapter's own greedy tokens."""
    engine = Engine(copy.deepcopy(debug_model), max_batch_size=4, num_blocks=64, block_size=4,
                    adapters=[adapter for adapter, _ in adapters.values()])
    prompt = random_prompts([17], seed=5)[0]  # four full blocks
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    hits = []
    for name in ("a", None, "b", "a", None):
        before = engine.stats.prefix_hit_tokens
        [result] = engine.generate([prompt], params, [name])
        hits.append(engine.stats.prefix_hit_tokens - before)
        reference = debug_model if name is None else adapters[name][1]
        assert result.token_ids == greedy_reference(reference, prompt, 4), name
    assert hits == [0, 0, 0, 16, 16]
