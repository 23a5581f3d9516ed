"""Greedy generation through the paged engine equals `transformers` generate(do_sample=False), token for
token, on the same weights (a tiny random HF model saved to disk and loaded by load_hf_model), with prompts
prefilled in chunks and, the second time, mostly from the prefix cache."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.models.hf import load_hf_model  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from cybertron.serve.sampling import SamplingParams  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=256)
CASES = {
    "llama-gqa": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # Mixtures of experts: routing per decoded token through the same grouped experts as training.
    "mixtral": (transformers.MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                                 sliding_window=None)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, norm_topk_prob=True)),
    # Sliding windows shorter than the prompts: the paged cache masks keys older than each layer's window.
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2-window-layers": (transformers.Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=True,
                                                           sliding_window=5, max_window_layers=1)),
}
NEW_TOKENS = 24


def _hf_model(name, path):
    config_cls, extra = CASES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra)).float().eval()
    with torch.no_grad():  # larger random weights: sharper distributions, so argmax ties are implausible
        for param in model.parameters():
            param.mul_(3.0)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_generation_matches_transformers(name, tmp_path):
    hf = _hf_model(name, tmp_path / "hf")
    # No end-of-text on either side (min_new_tokens would instead mask eos and change the argmax).
    hf.generation_config.eos_token_id = None
    ours = load_hf_model(tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, COMMON["vocab_size"], (n,), generator=gen).tolist() for n in (1, 9, 23)]
    prompts.append(prompts[2][:17] + prompts[1][:3])  # shares two full blocks with the third prompt
    expected = []
    for prompt in prompts:  # one at a time: no padding on the transformers side
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                              pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    # A budget of 12 tokens a step: the longer prompts are prefilled in chunks.
    engine = Engine(ours, max_batch_size=3, num_blocks=24, block_size=8, max_prefill_tokens=12)
    for _ in range(2):
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == expected
    assert engine.stats.prefix_hit_tokens >= 16 + 8 + 16 + 16
