"""Compute dtype: fp32, or bf16 / fp16 autocast with fp32 master weights and optimizer state (fp16 with dynamic
loss scaling, train/loss_scale.py)."""

from __future__ import annotations

import contextlib

import torch

from cybertron.config import canonical_dtype
from cybertron.errors import ConfigError

# The torch dtype of each canonical name of cybertron.config's vocabulary (aliases are resolved when parsed).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAIN_DTYPES = ("fp32", "bf16", "fp16")


def resolve_dtype(name: str, device: torch.device) -> str:
    name = canonical_dtype(name)
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in TRAIN_DTYPES:
        raise ConfigError(f"train.dtype must be auto, fp32, bf16 or fp16 (or bfloat16/float32/float16), "
                          f"got {name!r}")
    return name


def autocast(dtype_name: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype_name])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use cpu or auto")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)
