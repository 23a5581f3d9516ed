"""The model flags `cybertron generate` and `cybertron serve` share, and the device they name."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cybertron.errors import UserError

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--out", type=Path, metavar="RUN_DIR",
                        help="a cybertron run directory (its newest checkpoint is loaded)")
    source.add_argument("--model", type=Path, metavar="HF_DIR",
                        help="a Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="weights/KV dtype for --model (auto: bfloat16 on CUDA, float32 on CPU)")


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available else cpu; UserError for an unknown or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
    return device
