"""Sliding-window attention against `transformers`: Mistral, Mixtral, Qwen2/Qwen3 (use_sliding_window +
max_window_layers or layer_types), Qwen2-MoE and Qwen3-MoE on tiny random configs, at a sequence several windows
long; the same logits on import, through the paged KV cache, and after our export."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.errors import ConfigError, UserError  # noqa: E402
from cybertron.models.config import ModelConfig  # noqa: E402
from cybertron.models.hf import config_to_hf, load_hf_model, save_hf_model  # noqa: E402
from cybertron.models.llama import build_model  # noqa: E402
from cybertron.serve.cache import PagedKVCache  # noqa: E402

WINDOW = 6
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
CASES = {
    "mistral": (transformers.MistralConfig, dict(sliding_window=WINDOW)),
    "mixtral": (transformers.MixtralConfig, dict(sliding_window=WINDOW, num_local_experts=4,
                                                 num_experts_per_tok=2)),
    "qwen2-max-window-layers": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                               max_window_layers=1)),
    "qwen3-layer-types": (transformers.Qwen3Config, dict(
        use_sliding_window=True, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "qwen2-moe": (transformers.Qwen2MoeConfig, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=2, num_experts=4, **MOE)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                    num_experts=4, **MOE)),
}


def _hf_model(name, path):
    config_cls, extra = CASES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra),
                                                          attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def _tokens():
    return torch.randint(0, COMMON["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
def test_windowed_logits_match_transformers(name, tmp_path):
    hf = _hf_model(name, tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    assert ours.config.sliding_window == WINDOW
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        assert (expected - _full_attention(name, hf, tmp_path)(tokens).logits).abs().max() > 1e-3  # windows matter
        assert (ours(tokens) - expected).abs().max().item() <= 1e-5


def _full_attention(name, hf, tmp_path):
    # The same weights with the window switched off: shows the test's sequence is long enough to tell.
    config_cls, extra = CASES[name]
    off = {**extra, "sliding_window": None, "use_sliding_window": False, "layer_types": None}
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **off),
                                                          attn_implementation="sdpa").float().eval()
    model.load_state_dict(hf.state_dict())
    return model


@pytest.mark.parametrize("name", ["mistral", "qwen3-layer-types"])
def test_export_keeps_the_windows(name, tmp_path):
    _hf_model(name, tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    save_hf_model(ours.state_dict(), ours.config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_a_family_without_windows_refuses_to_export_one():
    cfg = ModelConfig(n_layers=2, sliding_window=8)
    with pytest.raises(UserError, match="LlamaForCausalLM"):
        config_to_hf(cfg)
    mistral = ModelConfig(n_layers=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                          extra={"architecture": "MistralForCausalLM"})
    with pytest.raises(UserError, match="every layer"):
        config_to_hf(mistral)


def _cache(model, windows=True, num_blocks=16, block_size=4):
    cfg = model.config
    cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_size, num_blocks, block_size)
    if windows:
        cache.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
    return cache


def test_paged_cache_honours_the_window_in_prefill_chunks_and_decode():
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, sliding_window=5,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    cache = _cache(model)
    with torch.no_grad():
        expected = model(tokens)  # no cache: the mask path
        for seq in (0, 1):
            cache.reserve(seq, 20)
        got = []
        # Row 0 prefills 9 then 3, row 1 prefills 12 in one go; then both decode one token a step.
        got.append(model(tokens[:1, :9], cache=cache.batch([0], [0], [9]))[0])
        got.append(model(tokens[:1, 9:12], positions=torch.arange(9, 12)[None], cache=cache.batch([0], [9], [3]))[0])
        first = torch.cat(got)
        row1 = model(tokens[1:, :12], cache=cache.batch([1], [0], [12]))[0]
        steps = []
        for p in range(12, 20):
            batch = cache.batch([0, 1], [p, p], [1, 1])
            steps.append(model(tokens[:, p:p + 1], positions=batch.positions, cache=batch)[:, 0])
    torch.testing.assert_close(first, expected[0, :12], rtol=0, atol=1e-5)
    torch.testing.assert_close(row1, expected[1, :12], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), expected[:, 12:], rtol=0, atol=1e-5)
    # Alone with consecutive blocks (the engine's view-not-gather decode) the window holds too.
    alone = _cache(model)
    alone.reserve(0, 20)
    with torch.no_grad():
        model(tokens[:1, :19], cache=alone.batch([0], [0], [19]))
        last = model(tokens[:1, 19:], positions=torch.tensor([[19]]), cache=alone.batch([0], [19], [1]))
    torch.testing.assert_close(last[0, 0], expected[0, 19], rtol=0, atol=1e-5)


def test_a_cache_not_set_up_for_windows_is_refused_in_one_line():
    model = build_model(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    sliding_window=4), seed=0)
    cache = _cache(model, windows=False)
    cache.reserve(0, 4)
    with pytest.raises(ConfigError, match="sliding_window=4 needs a KV cache") as err:
        model(torch.zeros(1, 4, dtype=torch.int64), cache=cache.batch([0], [0], [4]))
    assert "\n" not in str(err.value)
