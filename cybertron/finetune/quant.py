"""NF4 storage of frozen base weights for QLoRA, with torchao's NF4Tensor (runs on CPU and CUDA).

NF4 keeps 4-bit codes per weight plus an absmax scale per block of `block_size` weights; the scales are
themselves quantized to int8 in groups ("double quantization"), so storage is about 4 + 8/64 bits per
weight. The matmul dequantizes on the fly; gradients flow to the input (for the adapters), never to the
frozen weight.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from cybertron.errors import ConfigError
from cybertron.finetune.lora import lora_modules

DEFAULT_BLOCK_SIZE = 64
MAX_SCALER_BLOCK = 256
# ZeRO-3 (FSDP2) splits an NF4 weight into equal row shards, and torchao can only split it where every group
# of quantized scales falls inside one shard. The groups are laid out for SHARD_UNIT equal shards whatever the
# world size, so one process and 1, 2, 4 or 8 ranks quantize a weight identically.
SHARD_UNIT = 8


@functools.cache
def _nf4() -> Any:
    """torchao's NF4 module (its home moved between releases), imported only when QLoRA is asked for."""
    # Importing torchao logs a warning per optional CUDA kernel library it cannot load (expected on CPU) and
    # torch logs a deprecation notice about torchao's enums: noise for a user, so muted for the import only.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        try:
            from torchao.dtypes import nf4tensor as nf4_tensor
        except ImportError as err:
            raise ConfigError("finetune.method=qlora needs torchao: pip install 'cybertron[quant]'") from err
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return nf4_tensor


def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _nf4().linear_nf4(x, weight)


def _scaler_block(n_blocks: int) -> int:
    """The largest group size <= 256 dividing the number of scales per SHARD_UNIT-th of the weight (torchao
    requires an exact division; a weight with fewer than SHARD_UNIT-divisible blocks uses the largest part that
    divides)."""
    per_shard = n_blocks // math.gcd(n_blocks, SHARD_UNIT)
    return next(size for size in range(min(MAX_SCALER_BLOCK, per_shard), 0, -1) if per_shard % size == 0)


def _local(weight: torch.Tensor) -> torch.Tensor:
    """This rank's part of a weight (FSDP2 keeps a DTensor whose local tensor is the NF4 shard)."""
    return weight.to_local() if isinstance(weight, DTensor) else weight


def shard_problem(weight: torch.Tensor, name: str, shards: int) -> str | None:
    """Why FSDP2 cannot split this NF4 weight into `shards` equal row shards (None when it can)."""
    rows, groups = weight.shape[0], weight.n_blocks // weight.scaler_block_size
    if rows % shards == 0 and groups % shards == 0:
        return None
    return (f"finetune.method=qlora with parallel.data_parallel=zero3 cannot shard {name} (shape "
            f"{tuple(weight.shape)}, {groups} NF4 scale groups) over {shards} ranks: its rows and scale groups must "
            "split evenly over the ranks; use parallel.data_parallel=ddp")


def check_shardable(model: nn.Module, shards: int) -> None:
    """Refuse, naming the first weight, a model whose NF4 base cannot be split over `shards` ranks."""
    for name, module in lora_modules(model):
        if module.quantized and (problem := shard_problem(module.weight, f"{name}.weight", shards)):
            raise ConfigError(problem)


def to_nf4(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    if weight.numel() % block_size:
        raise ConfigError(f"a weight of shape {tuple(weight.shape)} does not split into NF4 blocks of "
                          f"{block_size}; choose a finetune.nf4_block_size that divides {weight.numel()}")
    n_blocks = weight.numel() // block_size
    return _nf4().to_nf4(weight.detach().contiguous(), block_size, _scaler_block(n_blocks))


@torch.no_grad()
def quantize_base_(model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Store the base weight of every LoRALinear in NF4 (in place); returns how many were quantized."""
    count = 0
    for _, module in lora_modules(model):
        if not module.quantized:
            module.weight = nn.Parameter(to_nf4(module.weight, block_size), requires_grad=False)
            module.quantized = True
            module.base_linear = nf4_linear
            count += 1
    return count


def nf4_storage_bytes(weight: torch.Tensor) -> int:
    """Bytes an NF4 tensor keeps on this rank: codes, quantized scales, their factors and mean, and the 16-entry
    table (under ZeRO-3, this rank's shard of the first three)."""
    weight = _local(weight)
    parts = (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
             weight.nf4)
    return sum(t.numel() * t.element_size() for t in parts)


def quantized_bits_per_param(model: nn.Module) -> float:
    """Measured storage of the NF4 base weights, in bits per weight (0 when none is quantized)."""
    stored, count = 0, 0
    for _, module in lora_modules(model):
        if module.quantized:
            stored += nf4_storage_bytes(module.weight)
            count += _local(module.weight).numel()
    return 8 * stored / count if count else 0.0

