"""FP8 training of the Linear layers (`train.fp8`), by torchao's float8: each selected nn.Linear becomes a
`Float8Linear` whose matmuls (forward and both backward ones) cast their operands to float8 with dynamic
scales, tensorwise (one scale per tensor) or rowwise (one per row; more accurate, a little slower).

Weights, gradients and optimizer state stay in high precision and the parameter names do not change, so
checkpoints and Hugging Face exports are those of the plain model. The speed-up needs FP8 tensor cores
(CUDA compute capability >= 8.9: Ada, Hopper, Blackwell) and torch.compile to fuse the casts."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from cybertron.errors import ConfigError

FP8_RECIPES = ("none", "tensorwise", "rowwise")
# torch._scaled_mm (the float8 GEMM) requires both dims of every operand divisible by 16.
_FP8_ALIGNMENT = 16
_MIN_CAPABILITY = (8, 9)


def float8_support_error(device: torch.device) -> str | None:
    """Why float8 training cannot run on `device` (what was found), or None when it can."""
    if device.type != "cuda":
        return f"found device {device.type}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    capability = torch.cuda.get_device_capability(index)
    if capability < _MIN_CAPABILITY:
        return (f"found {torch.cuda.get_device_name(index)} with compute capability "
                f"{capability[0]}.{capability[1]}")
    return None


def validate_float8(recipe: str, device: torch.device, micro_batch_tokens: int | None = None) -> None:
    """ConfigError naming train.fp8 when the recipe is unknown, torchao is missing, the device lacks FP8 or
    the tokens of one micro-batch are not a multiple of 16 (the weight gradient's float8 GEMM contracts
    over them)."""
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"train.fp8 must be one of {', '.join(FP8_RECIPES)}, got {recipe!r}")
    if recipe == "none":
        return
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"train.fp8={recipe} needs torchao: pip install 'cybertron[fp8]'")
    problem = float8_support_error(device)
    if problem is not None:
        raise ConfigError(f"train.fp8={recipe} needs a CUDA GPU with compute capability >= "
                          f"{_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} (H100, L4, RTX 4090, ...); {problem}. "
                          "Use train.fp8=none")
    if micro_batch_tokens is not None and micro_batch_tokens % _FP8_ALIGNMENT:
        raise ConfigError(f"train.fp8={recipe} needs the tokens of one micro-batch (sequences x data.seq_len = "
                          f"{micro_batch_tokens}) to be a multiple of {_FP8_ALIGNMENT}; change data.seq_len or "
                          "train.micro_batch_size / train.global_batch_size")


def float8_module_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """torchao's module_filter_fn: True for the Linear layers to convert. The output head stays in high
    precision (the vocabulary projection feeds the loss directly, and fp8 there costs accuracy for little
    speed, as torchtitan also skips it); so does any Linear whose dims the float8 GEMM cannot take."""
    head = getattr(model, "lm_head", None)

    def keep(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and module is not head
                and module.in_features % _FP8_ALIGNMENT == 0 and module.out_features % _FP8_ALIGNMENT == 0)

    return keep


def float8_linear_names(model: nn.Module) -> list[str]:
    """The names of the Linear layers `convert_to_float8` would swap, in module order."""
    keep = float8_module_filter(model)
    return [name for name, module in model.named_modules() if keep(module, name)]


def float8_compile_options(recipe: str) -> dict[str, bool]:
    """The inductor options a torch.compile of a model converted with `recipe` needs, passed to that compile
    only (`torch.compile(fn, options=...)`), never set process-wide.

    Rowwise scales computed in a compiled backward that recomputes the forward's casts must round like eager,
    else they can differ from the forward's and the loss goes NaN (pytorch/pytorch#150859; torchtitan enables
    the same option for this recipe)."""
    return {"emulate_precision_casts": True} if recipe == "rowwise" else {}


def convert_to_float8(model: nn.Module, recipe: str, fsdp_float8_all_gather: bool = False,
                      emulate: bool = False) -> list[str]:
    """Swap the selected Linear layers for torchao Float8Linear in place (before tensor parallelism,
    activation checkpointing, compile and FSDP wrap them, the order torchtitan applies its converters in);
    returns the converted layers' names. Compile the converted model with `float8_compile_options(recipe)`.

    fsdp_float8_all_gather: FSDP2 all-gathers the weights already cast to float8 (half the bytes of bf16);
    tensorwise only (`float8_all_gather_supported`). emulate: torchao's emulation, float8 casts with
    high-precision matmuls (for tests on devices without FP8 GEMMs)."""
    assert recipe in FP8_RECIPES and recipe != "none", recipe
    assert not fsdp_float8_all_gather or float8_all_gather_supported(recipe), recipe
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ConfigError(f"train.fp8={recipe} needs torchao: pip install 'cybertron[fp8]'") from err
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe),
                                 enable_fsdp_float8_all_gather=fsdp_float8_all_gather, emulate=emulate)
    names = float8_linear_names(model)
    convert_to_float8_training(model, module_filter_fn=float8_module_filter(model), config=config)
    return names


def float8_all_gather_supported(recipe: str) -> bool:
    """Whether FSDP2 (and tensor parallelism's Float8 styles) can all-gather in float8 under `recipe`.

    Only tensorwise: one scale per tensor can be computed for the whole weight before the all-gather (a
    single all-reduce of the shards' maxima). Rowwise scales are per row of the *transposed* weight too (the
    backward's GEMMs scale along the other axis), so a pre-cast shard cannot serve both; torchao refuses the
    combination and torchtitan all-gathers rowwise weights in high precision, as done here."""
    return recipe == "tensorwise"


def precompute_float8_scales(model: nn.Module) -> None:
    """Under FSDP2 float8 all-gather: the scales of every float8 weight from the whole weights in one
    all-reduce, used by the next all-gathers instead of each shard's own (torchao's
    precompute_float8_dynamic_scale_for_fsdp)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
