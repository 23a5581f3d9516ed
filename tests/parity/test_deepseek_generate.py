"""Greedy generation of a tiny DeepSeek-V3 through the paged engine equals `transformers` generate, token for
token, with the cache holding only the compressed latent + rope key per token (serve/latent_cache.py) and
attention in latent space (with YaRN's softmax scale too); prompts are prefilled in chunks and, the second
time, from the prefix cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.models.hf import load_hf_model  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from cybertron.serve.latent_cache import LatentKVCache  # noqa: E402
from cybertron.serve.sampling import SamplingParams  # noqa: E402
from tests.parity.test_deepseek_hf import BASE, hf_deepseek  # noqa: E402

NEW_TOKENS = 16


@pytest.mark.parametrize("name", [pytest.param("q-lora-interleaved-groups", marks=pytest.mark.slow),
                                  "plain-q-half-rope-no-groups", "yarn-mscale"])
def test_greedy_generation_matches_transformers(name, tmp_path):
    hf = hf_deepseek(name)
    with torch.no_grad():  # larger weights: sharper distributions, so argmax ties are implausible
        for param in hf.parameters():
            param.mul_(3.0)
    hf.save_pretrained(tmp_path / "hf")
    hf.generation_config.eos_token_id = None
    ours = load_hf_model(tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=gen).tolist() for n in (1, 9, 23)]
    prompts.append(prompts[2][:17] + prompts[1][:3])  # shares two full blocks with the third prompt
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    engine = Engine(ours, max_batch_size=3, num_blocks=24, block_size=8, max_prefill_tokens=12)
    cache = engine.cache
    assert isinstance(cache, LatentKVCache)
    # One 'head' of kv_lora_rank + qk_rope_head_dim per token and layer; nothing per attention head.
    assert cache.k.shape == (3, 25, 8, 1, BASE["kv_lora_rank"] + BASE["qk_rope_head_dim"]) and cache.v.numel() == 0
    for _ in range(2):
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == expected
    assert engine.stats.prefix_hit_tokens >= 16 + 8 + 16 + 16


def test_single_sequence_decode_matches_transformers(tmp_path):
    """Batch-1 decode over consecutive blocks (the cache's view path, no gather), and through decode graphs."""
    hf = hf_deepseek("q-lora-interleaved-groups", seed=3)
    hf.save_pretrained(tmp_path / "hf")
    hf.generation_config.eos_token_id = None
    ours = load_hf_model(tmp_path / "hf")
    prompt = list(range(5, 18))
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0)
    for graphs in (False, True):  # True: the decode-graph path (static padded batches), run eagerly on CPU
        engine = Engine(ours, max_batch_size=1, num_blocks=8, block_size=4, decode_graphs=graphs)
        got = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].token_ids
        assert got == want[0, len(prompt):].tolist()
