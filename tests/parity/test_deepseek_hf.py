"""DeepSeek-V3 (multi-head latent attention + sigmoid, group-limited routing with shared experts, YaRN with
mscale/mscale_all_dim) against `transformers` on tiny random configs: import gives the same logits, our export
loads back with them."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.errors import UserError  # noqa: E402
from cybertron.models.hf import config_from_hf, load_hf_model, save_hf_model  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, n_routed_experts=8,
            num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            kv_lora_rank=24, q_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_group=4, topk_group=2, norm_topk_prob=True, num_mtp_layers=0)
CASES = {
    "q-lora-interleaved-groups": {},
    "plain-q-half-rope-no-groups": dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1,
                                        norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=0),
    # YaRN as DeepSeek-V3 ships it: mscale != mscale_all_dim, so both the cos/sin factor and the softmax scale's
    # mscale^2 differ from 1; a sequence past original_max_position_embeddings.
    "yarn-mscale": dict(q_lora_rank=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
}


def hf_deepseek(name: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**BASE, **CASES[name]})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # routers far from uniform, a selection bias that matters, random norms
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 0.5)
            elif "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def _max_diff(hf, ours, tokens) -> float:
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_deepseek_v3_matches_transformers_and_exports_back(name, tmp_path):
    hf = hf_deepseek(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").eval()
    cfg = ours.config
    assert cfg.is_mla and cfg.score_func == "sigmoid" and cfg.shared_ffn_dim == 64
    tokens = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(1))
    assert _max_diff(hf, ours, tokens) <= 1e-5
    save_hf_model(ours.state_dict(), cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert type(back) is type(hf)
    assert _max_diff(back, ours, tokens) <= 1e-5


def test_other_rope_scaling_is_refused_in_one_line():
    hf = transformers.DeepseekV3Config(**BASE).to_dict()
    hf["architectures"] = ["DeepseekV3ForCausalLM"]
    hf["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(UserError, match="rope_scaling 'linear'") as err:
        config_from_hf(hf)
    assert "\n" not in str(err.value)


def test_multi_token_prediction_layers_are_skipped(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_deepseek("plain-q-half-rope-no-groups")
    hf.save_pretrained(tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(file))
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # as DeepSeek-V3's layer 61 of 61
    save_file(state, str(file), metadata={"format": "pt"})
    ours = load_hf_model(tmp_path / "hf").eval()
    assert _max_diff(hf, ours, torch.arange(12)[None]) <= 1e-5
