"""Our MoE decoder against `transformers` Mixtral / Qwen2-MoE / Qwen3-MoE on tiny random configs: HF's per-expert
and fused checkpoint layouts import with the same logits, and our export loads back in transformers."""

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from cybertron.errors import UserError  # noqa: E402
from cybertron.models.hf import config_from_hf, load_hf_model, save_hf_model  # noqa: E402
from cybertron.models.llama import build_model  # noqa: E402
from cybertron.models.presets import preset_config  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
CASES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
                                                     head_dim=32, mlp_only_layers=[1])),
    "qwen3-moe-norm-step2": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=3,
                                                               moe_intermediate_size=32, norm_topk_prob=True,
                                                               decoder_sparse_step=2)),
    "qwen2-moe-shared": (transformers.Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2,
                                                           moe_intermediate_size=32,
                                                           shared_expert_intermediate_size=48)),
}


def _hf_model(name):
    config_cls, extra = CASES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra),
                                                          attn_implementation="sdpa").float().eval()
    with torch.no_grad():  # routers far from uniform, so every token's choice matters; biases and norms random
        for n, p in model.named_parameters():
            if n.endswith("gate.weight"):
                p.normal_(0, 0.5)
            elif n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _tokens():
    return torch.randint(0, COMMON["vocab_size"], (2, 29), generator=torch.Generator().manual_seed(1))


def _max_diff(hf, ours, tokens) -> float:
    with torch.no_grad():
        return (hf(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
def test_per_expert_checkpoint_matches_transformers(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes one tensor per expert
    ours = load_hf_model(tmp_path / "hf").eval()
    assert ours.config.n_experts == CASES[name][1].get("num_experts", CASES[name][1].get("num_local_experts"))
    assert _max_diff(hf, ours, _tokens()) <= 1e-5
    save_hf_model(ours.state_dict(), ours.config, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert type(back) is type(hf)
    assert _max_diff(back, ours, _tokens()) <= 1e-5


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe-shared"])
def test_fused_layout_imports(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    state = hf.state_dict()  # transformers 5 in memory: experts.gate_up_proj (E, 2 ffn, dim), experts.down_proj
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "hf" / "model.safetensors"))
    ours = load_hf_model(tmp_path / "hf").eval()
    assert _max_diff(hf, ours, _tokens()) <= 1e-5


def test_our_moe_preset_exports_to_a_family_transformers_loads(tmp_path):
    cfg = preset_config("moe", vocab_size=128)
    ours = build_model(cfg, seed=3).eval()
    save_hf_model(ours.state_dict(), cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert _max_diff(back, ours, _tokens()) <= 1e-5


def _hf_dict(name, **changes):
    config_cls, extra = CASES[name]
    return {**config_cls(**COMMON, **extra).to_dict(), "architectures": [config_cls.__name__.replace(
        "Config", "ForCausalLM")], **changes}


@pytest.mark.parametrize("name, changes, needle", [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen3-moe", {"topk_method": "group_limited_greedy"}, "topk_method"),
    ("qwen3-moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ("qwen3-moe", {"scoring_func": "sigmoid"}, "scoring_func"),
])
def test_unsupported_routing_is_refused_naming_the_field(name, changes, needle):
    with pytest.raises(UserError, match=needle):
        config_from_hf(_hf_dict(name, **changes))


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    cfg = preset_config("moe", vocab_size=128, bias_update_rate=1e-3)
    model = build_model(cfg, seed=0)
    model.layers["0"].mlp.gate.e_score_correction_bias.fill_(0.1)
    with pytest.raises(UserError, match="bias_update_rate"):
        save_hf_model(model.state_dict(), cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    sig = preset_config("moe", vocab_size=128, score_func="sigmoid")
    with pytest.raises(UserError, match="score_func"):
        save_hf_model(build_model(sig, seed=0).state_dict(), sig, tmp_path / "b")
    assert json.loads(json.dumps(cfg.to_dict()))["n_experts"] == cfg.n_experts


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe"])
def test_balancing_loss_matches_transformers(name, tmp_path):
    from cybertron.train.moe_balance import RouterBalance, balancing_loss

    hf = _hf_model(name)
    hf.config.output_router_logits = True
    hf.config.router_aux_loss_coef = 0.02
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf").train()
    assert ours.config.aux_loss_coef == 0.02  # output_router_logits switches HF's loss on, and ours
    tokens = _tokens()
    want = hf.train()(tokens, output_router_logits=True).aux_loss
    ours(tokens)
    got = balancing_loss(RouterBalance.of(ours)._drain(), ours.config.n_experts)
    assert abs(got.item() - want.item()) <= 1e-6
