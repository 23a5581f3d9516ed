"""train.fp8: validation at the config boundary, which Linear layers convert, and that a converted model
trains like the bf16 one (torch 2.13 runs torchao's Float8Linear on CPU by emulation; the speed is GPU-only)."""

from __future__ import annotations

import pytest
import torch

from cybertron.config import TrainConfig
from cybertron.errors import ConfigError
from cybertron.finetune.config import FinetuneConfig
from cybertron.finetune.config import validate as validate_finetune
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.pretrain import build_trainer, validate
from cybertron.train import float8
from cybertron.train.float8 import convert_to_float8, float8_compile_options, float8_linear_names
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import LanguageModelStep, Trainer

pytest.importorskip("torchao")


def _cfg(fp8: str, device: str = "cpu") -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.fp8, cfg.train.device = fp8, device
    return cfg


def test_unknown_fp8_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.fp8 must be one of none, tensorwise, rowwise, got 'fp4'"):
        validate(_cfg("fp4"))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_on_cpu_says_what_device_was_found(recipe):
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9.*found device cpu"):
        validate(_cfg(recipe))


def test_fp8_none_is_the_default_and_validates():
    cfg = TrainConfig()
    cfg.train.device = "cpu"
    assert cfg.train.fp8 == "none"
    validate(cfg)


def test_fp8_validates_with_fsdp_and_tp_and_is_refused_with_pp(monkeypatch):
    monkeypatch.setattr(float8, "float8_support_error", lambda device: None)  # pretend an H100
    cfg = _cfg("rowwise")
    cfg.model.preset, cfg.data.vocab_size = "debug", 256
    validate(cfg, world_size=2)  # zero3 over 2 ranks
    cfg.parallel.tp = 2
    validate(cfg, world_size=2)
    cfg.parallel.tp, cfg.parallel.pp = 1, 2
    with pytest.raises(ConfigError, match=r"train\.fp8=rowwise does not run with pipeline parallelism"):
        validate(cfg, world_size=2)


def test_fp8_needs_micro_batch_tokens_divisible_by_16(monkeypatch):
    monkeypatch.setattr(float8, "float8_support_error", lambda device: None)
    cfg = _cfg("tensorwise")
    cfg.data.seq_len, cfg.train.global_batch_size = 255, 3
    with pytest.raises(ConfigError, match=r"tokens of one micro-batch .* = 765\) to be a multiple of 16"):
        validate(cfg)


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setattr(float8.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'cybertron\[fp8\]'"):
        validate(_cfg("tensorwise"))


def test_finetune_fp8_needs_full_weights_and_an_fp8_device():
    cfg = FinetuneConfig()
    cfg.model.path, cfg.data.path, cfg.train.fp8, cfg.train.device = "base", "chat.jsonl", "tensorwise", "cpu"
    with pytest.raises(ConfigError, match=r"train\.fp8=tensorwise needs a CUDA GPU"):
        validate_finetune(cfg)  # on this CPU machine
    cfg.finetune.method = "lora"
    with pytest.raises(ConfigError, match="train.fp8"):
        validate_finetune(cfg)


def test_filter_converts_every_block_linear_but_not_the_head():
    model = build_model(preset_config("tiny"), seed=0)
    per_block = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = [f"layers.{i}.{name}" for i in range(model.config.n_layers) for name in per_block]
    assert float8_linear_names(model) == expected


def test_filter_skips_linears_whose_dims_are_not_multiples_of_16():
    # ffn_dim 200: gate/up (192 -> 200) and down (200 -> 192) cannot run in torch._scaled_mm.
    model = build_model(preset_config("tiny", ffn_dim=200, tie_embeddings=True), seed=0)
    names = float8_linear_names(model)
    assert not [n for n in names if ".mlp." in n]
    assert len(names) == 4 * model.config.n_layers and "lm_head" not in names


def _train(model: torch.nn.Module, steps: int, device: torch.device, compile: bool = False,
           compile_options: dict | None = None) -> list[float]:
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab // 4, (8, 65), generator=g) for _ in range(4)]  # a learnable subset
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    step_fn = LanguageModelStep(compile=compile, compile_options=compile_options)
    trainer = Trainer(model, opt, step_fn, lambda s: 1e-3, 1.0, autocast=amp)
    losses = []
    for step in range(steps):
        tokens = batches[step % len(batches)].to(device)
        losses.append(trainer.train_step(step, [{"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}]).loss.item())
    return losses


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_model_trains_like_bf16_on_cpu(recipe):
    from torchao.float8.float8_linear import Float8Linear

    reference = _train(build_model(preset_config("debug"), seed=0), 12, torch.device("cpu"))
    model = build_model(preset_config("debug"), seed=0)
    names_before = list(model.state_dict())
    converted = convert_to_float8(model, recipe)
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in converted)
    assert list(model.state_dict()) == names_before  # checkpoints keep the plain model's names
    losses = _train(model, 12, torch.device("cpu"))
    assert losses[-1] < losses[0] - 0.3
    assert max(abs(a - b) / b for a, b in zip(losses, reference)) < 0.02


def test_rowwise_conversion_leaves_process_wide_inductor_settings_alone():
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    convert_to_float8(build_model(preset_config("debug"), seed=0), "rowwise")
    assert inductor_config.get_config_copy() == before
    assert inductor_config.emulate_precision_casts is before["emulate_precision_casts"]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_only_the_rowwise_step_compile_asks_for_eager_rounding(recipe):
    # The option reaches the train step's own torch.compile (pytorch/pytorch#150859), not the process.
    cfg = _cfg(recipe)
    cfg.model.preset, cfg.train.compile = "debug", True
    model = build_model(preset_config("debug"), seed=0)
    trainer, _ = build_trainer(cfg, model, dims=None, mesh=None, dtype_name="bf16", device=torch.device("cpu"))
    assert trainer.step_fn._loss_sum.get_compiler_config()["emulate_precision_casts"] is (recipe == "rowwise")


def test_build_trainer_applies_fp8_on_one_process():
    from torchao.float8.float8_linear import Float8Linear

    cfg = _cfg("rowwise")  # build_trainer is below validate: on CPU the emulated path still runs
    cfg.model.preset = "debug"
    model = build_model(preset_config("debug"), seed=0)
    trainer, parts = build_trainer(cfg, model, dims=None, mesh=None, dtype_name="bf16", device=torch.device("cpu"))
    assert isinstance(trainer.model.get_submodule("layers.0.mlp.down_proj"), Float8Linear)
    assert not isinstance(trainer.model.lm_head, Float8Linear)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_curve_matches_bf16_on_gpu(recipe):
    device = torch.device("cuda")
    if float8.float8_support_error(device):
        pytest.skip(float8.float8_support_error(device))
    torch._dynamo.reset()  # fresh compiles: earlier tests' graphs must not count against the recompile limit
    reference = _train(build_model(preset_config("tiny"), device=device, seed=0), 30, device, compile=True)
    model = build_model(preset_config("tiny"), device=device, seed=0)
    convert_to_float8(model, recipe)
    losses = _train(model, 30, device, compile=True, compile_options=float8_compile_options(recipe))
    smooth = lambda xs: [sum(xs[i:i + 5]) / 5 for i in range(len(xs) - 4)]
    assert max(abs(a - b) / b for a, b in zip(smooth(losses), smooth(reference))) < 0.03
