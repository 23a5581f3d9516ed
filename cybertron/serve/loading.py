"""Model + tokenizer for `cybertron generate` and `cybertron serve`, from a run or an HF directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.models.llama import Transformer

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UserError instead of exiting, so the CLI reports bad flags in its one format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


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


def load_model_and_tokenizer(out: Path | None, model_dir: Path | None, device: torch.device,
                             dtype: str = "auto") -> tuple[Transformer, TextTokenizer, str]:
    """(model in eval mode, tokenizer, a display name) from exactly one of a run dir or an HF dir."""
    if (out is None) == (model_dir is None):
        raise UserError("give exactly one of --out RUN_DIR or --model HF_DIR")
    if out is not None:
        if not out.is_dir():
            raise UserError(f"--out {out} is not a directory; give a cybertron run directory")
        from cybertron.train.checkpoint import load_inference_model  # training stack only when needed

        model, tokenizer = load_inference_model(out, device)
        return model.eval(), tokenizer, out.resolve().name
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} is not a directory; give a Hugging Face model directory")
    from cybertron.models.hf import load_hf_model

    torch_dtype = DTYPES[dtype] or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = load_hf_model(model_dir, device=device, dtype=torch_dtype)
    return model.eval(), TextTokenizer.load(model_dir), model_dir.resolve().name
