"""Where fine-tuning and alignment start from: a Hugging Face model directory or a cybertron run directory.

A run directory may come from `cybertron train` (a pretrained model), `cybertron finetune` or
`cybertron align` (adapters are merged into the weights): alignment usually follows SFT, so an SFT run is
a valid starting point, and a model pretrained by cybertron needs no export round trip.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.models.llama import Transformer


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_base(path: Path) -> tuple[ModelConfig, TextTokenizer]:
    """(model config, tokenizer) of a base, checked without loading any weight."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model.path {path} is not a directory; give a Hugging Face model directory or a "
                        "cybertron run directory")
    if is_hf_dir(path):
        from cybertron.models.hf import read_hf_config

        cfg = read_hf_config(path)
        if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")) \
                and not any(path.glob("*.safetensors")):
            raise UserError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")
        tokenizer_dir = path
    else:
        from cybertron.train.checkpoint import read_model_config, resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(path)
        except UserError as err:
            raise UserError(f"{path} is not a Hugging Face model directory (config.json is missing) nor a "
                            "cybertron run directory (no complete checkpoint)") from err
        cfg = read_model_config(ckpt)
        tokenizer_dir = ckpt.parent.parent
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"{tokenizer_dir} has no tokenizer.json")
    tokenizer = TextTokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens, more than the "
                        f"model's vocab_size {cfg.vocab_size}")
    return cfg, tokenizer


def load_base_model(path: Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Transformer:
    """The base's weights as a plain Transformer in train mode (a fine-tuned run's adapters merged in)."""
    path = Path(path)
    if is_hf_dir(path):
        from cybertron.models.hf import load_hf_model

        return load_hf_model(path, device=device, dtype=dtype)
    from cybertron.train.checkpoint import load_inference_model

    model, _ = load_inference_model(path, device)
    return model.to(dtype).train()
