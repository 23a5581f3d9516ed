"""Our Llama-family decoder against `transformers` on tiny random configs: same weights, same logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.models.hf import load_hf_model, read_hf_config, save_hf_model  # noqa: E402
from cybertron.models.llama import build_model  # noqa: E402
from cybertron.models.presets import preset_config  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=256)

CASES = {
    "llama-gqa-untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2-qkv-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None)),
}


def _hf_model(name, tmp_path):
    config_cls, extra = CASES[name]
    torch.manual_seed(0)
    cfg = config_cls(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # random biases so a missing qkv bias would show
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model


def _tokens():
    return torch.randint(0, COMMON["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    hf = _hf_model(name, tmp_path)
    ours = load_hf_model(tmp_path / "hf").eval()
    tokens = _tokens()
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-qkv-bias", "qwen3-qk-norm"])
def test_export_loads_in_transformers_with_same_logits(name, tmp_path):
    _hf_model(name, tmp_path)
    ours = load_hf_model(tmp_path / "hf").eval()
    save_hf_model(ours.state_dict(), ours.config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5


def test_our_random_model_exports_to_llama(tmp_path):
    cfg = preset_config("debug")
    ours = build_model(cfg, seed=3).eval()
    save_hf_model(ours.state_dict(), cfg, tmp_path / "export", max_shard_bytes=200_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()  # sharded on purpose
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert read_hf_config(tmp_path / "export").n_kv_heads == cfg.n_kv_heads
    tokens = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max().item() <= 1e-5
