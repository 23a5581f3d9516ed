"""QLoRA: the frozen base stored in NF4 (torchao), measured at under 4.6 bits per weight, still trains."""

import pytest
import torch

pytest.importorskip("torchao")

from cybertron.errors import ConfigError  # noqa: E402
from cybertron.finetune.lora import LoRASpec, apply_lora, lora_modules, merged_state_dict  # noqa: E402
from cybertron.finetune.quant import (  # noqa: E402
    SHARD_UNIT,
    check_shardable,
    quantize_base_,
    quantized_bits_per_param,
    to_nf4,
)
from cybertron.models.llama import build_model  # noqa: E402
from cybertron.models.presets import preset_config  # noqa: E402
from cybertron.train.losses import cross_entropy_sum  # noqa: E402


def _qlora(**shape):
    model = build_model(preset_config("debug", **shape), seed=0)
    apply_lora(model, LoRASpec(rank=4))
    assert quantize_base_(model) == 7 * model.config.n_layers
    return model


@pytest.mark.parametrize("shape", [{}, dict(dim=256, ffn_dim=1024, n_layers=1)])
def test_nf4_base_is_stored_in_under_4_6_bits_per_weight(shape):
    model = _qlora(**shape)
    bits = quantized_bits_per_param(model)
    assert 4.0 < bits <= 4.6, bits
    for _, m in lora_modules(model):  # the codes are really 4-bit: two per byte
        assert m.weight.quantized_data.numel() * 2 == m.weight.numel()


def test_qlora_stays_close_to_the_base_and_trains():
    base = build_model(preset_config("debug"), seed=0)
    model = _qlora()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(tokens)
        out = model(tokens)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # quantization error, not a different model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = cross_entropy_sum(model(tokens[:, :-1]), tokens[:, 1:]) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # merging dequantizes: the plain model computes what the quantized one does
    plain = build_model(preset_config("debug"), seed=3).eval()
    plain.load_state_dict(merged_state_dict(model))
    with torch.no_grad():
        assert (plain(tokens) - model(tokens)).abs().max() < 1e-4


@pytest.mark.parametrize("rows", [64, 576, 4096])
def test_nf4_scale_groups_split_into_eight_equal_shards(rows):
    """The scale groups never straddle an eighth of the weight, so FSDP2 can split it over 1, 2, 4 or 8
    ranks, and the quantization does not depend on how many ranks there are."""
    w = torch.randn(rows, 64, generator=torch.Generator().manual_seed(0))
    q = to_nf4(w)
    assert (q.n_blocks // q.scaler_block_size) % SHARD_UNIT == 0, (q.n_blocks, q.scaler_block_size)
    assert q.scaler_block_size <= 256
    for shard in torch.chunk(q, SHARD_UNIT):  # torchao's own split, as FSDP2 does it
        assert shard.shape == (rows // SHARD_UNIT, 64)


def test_a_base_that_cannot_split_over_the_ranks_is_refused_naming_the_weight():
    model = _qlora()  # debug preset: kv projections have 32 rows
    check_shardable(model, 8)
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.q_proj\.weight \(shape \(64, 64\).* over 3 ranks"):
        check_shardable(model, 3)
