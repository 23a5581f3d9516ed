"""Gemma 2 and Gemma 3 (text) against `transformers` on tiny random configs: GeGLU, (1 + w) RMSNorm, sandwich
norms, sqrt(dim) embedding scale, query_pre_attn_scalar, final-logit soft-capping (Gemma 2), qk-norm and a
separate RoPE base for the sliding layers (Gemma 3), alternating sliding windows shorter than the sequence.
Logits within 1e-5, export loads back in transformers, greedy serving (soft-capped attention scores included)
equals transformers generate."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.errors import ConfigError  # noqa: E402
from cybertron.models.hf import load_hf_model, save_hf_model  # noqa: E402
from cybertron.serve.cache import PagedKVCache  # noqa: E402
from cybertron.serve.engine import Engine  # noqa: E402
from cybertron.serve.sampling import SamplingParams  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=24,
              sliding_window=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CASES = {
    # Soft-capping at caps the scores and logits reach, so a missing or misplaced tanh would show.
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, attn_logit_softcapping=0.5, final_logit_softcapping=3.0),
    # Without the attention cap (as some Gemma 2 fine-tunes ship).
    "gemma2-uncapped-attention": lambda: transformers.Gemma2Config(**COMMON, attn_logit_softcapping=None,
                                                                   final_logit_softcapping=3.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}}),
}


def _hf(name, path, scale=1.0, qk=1.0):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CASES[name](), attn_implementation="eager").float().eval()
    with torch.no_grad():  # norms away from their zero init, so (1 + w) vs w would show
        for n, p in model.named_parameters():
            p.mul_(scale * (qk if "q_proj" in n or "k_proj" in n else 1.0))
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model


def _diff(a, ours, length=21):
    tokens = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return (a(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_gemma_logits_and_export_match_transformers(name, tmp_path):
    hf = _hf(name, tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    cfg = ours.config
    assert (cfg.sliding_window, cfg.norm_plus_one, cfg.sandwich_norms, cfg.mlp_act) == (
        8, True, True, "gelu_pytorch_tanh")
    assert _diff(hf, ours) <= 1e-5  # 21 tokens: past the window of 8
    save_hf_model(ours.state_dict(), cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export",
                                                             attn_implementation="eager").float().eval()
    assert _diff(back, ours) <= 1e-5


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_greedy_serving_matches_transformers(name, tmp_path):
    """Prompts shorter and longer than the window of 8, prefilled in chunks of 8 tokens at most, then again from
    the prefix cache; decoding runs past the window on the sliding layers and over the paged cache on the
    global ones (capped scores on both for Gemma 2)."""
    # Queries and keys 4x larger: scores well past Gemma 2's cap of 0.5 (uncapped, most greedy tokens differ).
    hf = _hf(name, tmp_path / "hf", scale=2.0, qk=4.0)
    hf.generation_config.eos_token_id = None
    ours = load_hf_model(tmp_path / "hf")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (1, 6, 13)]
    prompts.append(prompts[2][:9] + prompts[1][:2])  # shares two full blocks with the third prompt
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    engine = Engine(ours, max_batch_size=3, num_blocks=32, block_size=4, max_prefill_tokens=8)
    for _ in range(2):
        results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
        assert [r.token_ids for r in results] == expected
    assert engine.stats.prefix_hit_tokens >= 8 + 8 + 12


def test_a_cache_without_the_attention_cap_is_refused_in_one_line(tmp_path):
    _hf("gemma2", tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    cfg = model.config
    cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_size, num_blocks=8, block_size=4)
    cache.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    cache.reserve(0, 3)
    with pytest.raises(ConfigError, match="attn_softcap=0.5") as err:
        model(torch.tensor([[5, 6, 7]]), cache=cache.batch([0], [0], [3]))
    assert "\n" not in str(err.value)
