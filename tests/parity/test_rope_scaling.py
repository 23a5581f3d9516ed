"""RoPE scaling types and partial rotary against `transformers`: logits within 1e-5 (fp32) on tiny configs, at
lengths on both sides of the original context, where the scaling changes the angles."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.errors import UserError  # noqa: E402
from cybertron.models.hf import config_from_hf, load_hf_model, save_hf_model  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, rope_theta=100.0)
HALF = 16 // 2 // 2  # pairs of a 16-wide head with partial_rotary_factor 0.5
SCALINGS = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.5 + 0.5 * i for i in range(8)]},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


def _save(tmp_path, config):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    model.save_pretrained(tmp_path / "hf")
    return model


def _diff(hf, ours, length):
    tokens = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_rope_logits_match_transformers(name, tmp_path):
    hf = _save(tmp_path, transformers.LlamaConfig(**COMMON, rope_scaling=dict(SCALINGS[name])))
    ours = load_hf_model(tmp_path / "hf").eval()
    assert ours.config.rope_scaling["rope_type"] == name.split("-")[0]
    # 12: within the original context (LongRoPE's short factors); 40: past max_position_embeddings (dynamic
    # NTK rescales the base, LongRoPE switches to its long factors). A fresh HF model per length: HF's dynamic
    # RoPE caches the longest length it has seen.
    for length in (12, 40):
        fresh = _save(tmp_path / str(length), hf.config)
        fresh.load_state_dict(hf.state_dict())
        assert _diff(fresh, ours, length) <= 1e-5, length


def test_dynamic_and_longrope_really_depend_on_length(tmp_path):
    # The long-length check above is only meaningful if the scaling changes the angles there.
    for name in ("dynamic", "longrope"):
        _save(tmp_path / name, transformers.LlamaConfig(**COMMON, rope_scaling=dict(SCALINGS[name])))
        ours = load_hf_model(tmp_path / name / "hf").eval()
        rotary = ours._rotary()
        long, short = (rotary.inv_freq(torch.device("cpu"), torch.tensor([[n]])) for n in (40, 12))
        assert not torch.equal(long, short)
        assert torch.equal(short[0, 0], rotary.inv_freq(torch.device("cpu")))  # within the original context


def test_yarn_without_original_context_defaults_to_max_position_embeddings(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0}  # transformers fills original_max_position_embeddings itself
    hf = _save(tmp_path, transformers.LlamaConfig(**COMMON, rope_scaling=scaling))
    ours = load_hf_model(tmp_path / "hf").eval()
    assert ours.config.rope_scaling["original_max_position_embeddings"] == COMMON["max_position_embeddings"]
    assert _diff(hf, ours, 40) <= 1e-5


def test_export_keeps_scaling_and_partial_rotary(tmp_path):
    config = transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5, pad_token_id=0,
                                     rope_scaling={"type": "longrope", "short_factor": [1.0] * HALF,
                                                   "long_factor": [3.0] * HALF},
                                     original_max_position_embeddings=16)
    config.head_dim = 16
    hf = _save(tmp_path, config)
    ours = load_hf_model(tmp_path / "hf").eval()
    assert ours.config.partial_rotary_factor == 0.5
    save_hf_model(ours.state_dict(), ours.config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    for length in (12, 40):
        assert _diff(back, ours, length) <= 1e-5
        assert _diff(hf, ours, length) <= 1e-5


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("mlp_bias", True), ("attention_bias", True),
                                         ("rope_scaling", {"rope_type": "mrope", "factor": 2.0}),
                                         ("rope_scaling", {"rope_type": "yarn"})])
def test_unimplemented_fields_are_refused_naming_them(field, value):
    hf = {"architectures": ["LlamaForCausalLM"], **COMMON, field: value}
    with pytest.raises(UserError) as err:
        config_from_hf(hf)
    assert "\n" not in str(err.value)
    assert (field if field != "rope_scaling" else "rope_scaling") in str(err.value) or "yarn" in str(err.value)
