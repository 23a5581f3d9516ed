"""LoRA / DoRA by module swap: a fresh adapter changes nothing, merge equals the unmerged forward, only
adapters train and only adapters are saved."""

import pytest
import torch

from cybertron.errors import ConfigError
from cybertron.finetune.lora import (
    LoRALinear,
    LoRASpec,
    adapters_disabled,
    apply_lora,
    lora_modules,
    merge_lora_,
    merged_state_dict,
    trainable_view,
)
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.checkpoint import load_checkpoint, save_checkpoint


def _model(seed=0, **overrides):
    return build_model(preset_config("debug", **overrides), seed=seed).eval()


def _tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def _perturb(model, seed=2):
    """Non-zero B and a changed magnitude, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
            if m.magnitude is not None:
                m.magnitude.mul_(1 + 0.1 * torch.rand(m.magnitude.shape, generator=g))


@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_leaves_output_unchanged(dora):
    base, model = _model(), _model()
    apply_lora(model, LoRASpec(dora=dora))
    with torch.no_grad():
        assert torch.equal(model(_tokens()), base(_tokens()))


def test_lora_linear_matches_the_formula():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 12, bias=True)
    layer = LoRALinear(linear, rank=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16)
    expected = x @ (linear.weight + 2.0 * layer.lora_B @ layer.lora_A).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # DoRA: rows of the merged weight rescaled to the learned magnitude.
    dora = LoRALinear(linear, rank=4, alpha=8.0, dora=True)
    with torch.no_grad():
        dora.lora_B.copy_(layer.lora_B)
        dora.lora_A.copy_(layer.lora_A)
        dora.magnitude.mul_(1.5)
    merged = linear.weight + 2.0 * layer.lora_B @ layer.lora_A
    expected = x @ (merged * (1.5 * linear.weight.norm(dim=1) / merged.norm(dim=1))[:, None]).T + linear.bias
    torch.testing.assert_close(dora(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_merged_state_dict_gives_the_same_logits(dora):
    model = _model()
    apply_lora(model, LoRASpec(dora=dora))
    _perturb(model)
    plain = _model(seed=5)
    plain.load_state_dict(merged_state_dict(model))  # strict: exactly the plain model's keys
    with torch.no_grad():
        expected = model(_tokens())
        assert (plain(_tokens()) - expected).abs().max() < 1e-5
        assert (merge_lora_(model)(_tokens()) - expected).abs().max() < 1e-5
    assert not list(lora_modules(model))


def test_only_adapters_are_trainable():
    model = _model()
    swapped = apply_lora(model, LoRASpec(rank=4, targets=["q_proj", "v_proj"]))
    assert len(swapped) == 2 * preset_config("debug").n_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    assert all(n.split(".")[-2] in ("q_proj", "v_proj") for n in trainable)
    # the base keeps its Hugging Face name
    assert "layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert set(trainable_view(model).state_dict()) == trainable


def test_glob_targets_and_unknown_target():
    model = _model()
    swapped = apply_lora(model, LoRASpec(targets=["layers.1.mlp.*"]))
    assert swapped == ["layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="qproj.*matches no linear layer"):
        apply_lora(_model(), LoRASpec(targets=["qproj"]))


def test_adapters_disabled_runs_the_base():
    base, model = _model(), _model()
    apply_lora(model, LoRASpec(dora=True))
    _perturb(model)
    tokens = _tokens()
    with torch.no_grad():
        adapted = model(tokens)
        with adapters_disabled(model):
            assert torch.equal(model(tokens), base(tokens))
        assert torch.equal(model(tokens), adapted)


def test_adapter_checkpoint_is_small_and_restores(tmp_path):
    shape = dict(dim=256, ffn_dim=512, n_heads=4, n_kv_heads=2, n_layers=2, vocab_size=1024)
    full, model = _model(**shape), _model(**shape)
    apply_lora(model, LoRASpec(rank=4))
    _perturb(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    adapters = save_checkpoint(tmp_path / "lora", 1, trainable_view(model), opt, {}, model.config)
    whole = save_checkpoint(tmp_path / "full", 1, full, torch.optim.AdamW(full.parameters()), {}, full.config)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())
    # 1.9% of the parameters; DCP's per-tensor overhead brings the files to ~5% at this small size
    assert size(adapters) < 0.1 * size(whole), (size(adapters), size(whole))

    fresh = _model(**shape)
    apply_lora(fresh, LoRASpec(rank=4), seed=9)
    load_checkpoint(adapters, trainable_view(fresh), None)
    with torch.no_grad():
        assert torch.equal(fresh(_tokens()), model(_tokens()))
