"""Per-expert LoRA on a mixture of experts: the default targets reach the stacked expert weights, the
adapted model equals its merged weights, and switching adapters off gives the base back."""

import pytest
import torch

from cybertron.errors import ConfigError
from cybertron.finetune.lora import LoRASpec, adapters_disabled, apply_lora, merge_lora_, merged_state_dict
from cybertron.finetune.lora_experts import LoRAExperts
from cybertron.models.llama import build_model
from cybertron.models.moe import GroupedExperts
from cybertron.models.presets import preset_config


def _model():
    cfg = preset_config("moe", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
    return build_model(cfg, seed=0).eval()


def _tokens():
    return torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))


def test_default_targets_adapt_attention_and_every_expert_projection():
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens)
    swapped = apply_lora(model, LoRASpec(rank=4))
    assert "layers.1.mlp.experts.down_proj" in swapped and "layers.0.self_attn.q_proj" in swapped
    experts = model.layers["0"].mlp.experts
    assert isinstance(experts, LoRAExperts) and experts.lora_A["gate_proj"].shape == (8, 4, 32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.mlp.experts.lora_B.up_proj" in trainable
    assert "layers.0.mlp.experts.gate_proj" not in trainable and "layers.0.mlp.gate.weight" not in trainable
    with torch.no_grad():
        # B = 0: a fresh adapter changes nothing (up to rounding: the plain experts fuse gate and up on CPU)
        torch.testing.assert_close(model(tokens), before, atol=1e-6, rtol=1e-6)


def test_adapted_experts_equal_their_merged_weights_and_switch_off():
    model = _model()
    tokens = _tokens()
    with torch.no_grad():
        base = model(tokens)
    apply_lora(model, LoRASpec(rank=4, targets=["gate_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
        adapted = model(tokens)
        with adapters_disabled(model):
            torch.testing.assert_close(model(tokens), base)
        assert (adapted - base).abs().max() > 1e-3
        state = merged_state_dict(model)
        plain = _model()
        plain.load_state_dict(state)
        torch.testing.assert_close(plain(tokens), adapted, atol=1e-5, rtol=1e-5)
        merge_lora_(model)
        assert type(model.layers["0"].mlp.experts) is GroupedExperts
        torch.testing.assert_close(model(tokens), adapted, atol=1e-5, rtol=1e-5)


def test_gradients_reach_expert_adapters_only():
    model = _model().train()
    apply_lora(model, LoRASpec(rank=2, targets=["layers.*.mlp.experts.up_proj"]))
    model(_tokens()).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"layers.{i}.mlp.experts.lora_{ab}.up_proj" for i in range(2) for ab in "AB"}


def test_dora_on_experts_is_refused():
    with pytest.raises(ConfigError, match="finetune.dora"):
        apply_lora(_model(), LoRASpec(rank=2, dora=True))
