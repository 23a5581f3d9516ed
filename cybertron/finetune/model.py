"""The model a fine-tuning or alignment run trains: a loaded base with the method applied.

The base is a Hugging Face model directory or a cybertron run directory (a pretrained model, or a
`cybertron finetune` / `cybertron align` run whose adapters are merged in: alignment usually follows SFT).
runs.py opens it (`open_base`, which the command hands to the recipe); this package never reads a run
directory itself, so it stays below runs.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cybertron.data.tokenizer import TextTokenizer
from cybertron.finetune.config import MethodSection
from cybertron.finetune.lora import apply_lora, trainable_view
from cybertron.finetune.quant import quantize_base_
from cybertron.models.config import ModelConfig
from cybertron.models.llama import Transformer
from cybertron.train.precision import DTYPES


@dataclass(frozen=True)
class BaseModel:
    """A base to start from: its config and tokenizer (checked, no weight read yet) and `load(device, dtype)`,
    which reads its weights as a plain Transformer in train mode (every rank calls it)."""

    path: Path
    config: ModelConfig
    tokenizer: TextTokenizer
    load: Callable[[torch.device, torch.dtype], Transformer]


# Opens (reads and checks) the base at a path: runs.open_base, which a command hands to the finetune and align
# recipes; they call it after the run directory's checks, so a wrong --out fails before a wrong --model.
OpenBase = Callable[[Path], BaseModel]


def base_dtype(name: str, compute: str, method: str) -> torch.dtype:
    """A frozen base may be stored in bf16 when the forward runs under bf16 autocast anyway: half the memory
    (a 8B base: 16 GB instead of 32). Trained weights and adapters stay fp32."""
    if name == "auto":
        name = "bf16" if compute == "bf16" and method != "full" else "fp32"
    return DTYPES[name]


def build_finetune_model(model: Transformer, method: MethodSection, seed: int,
                         wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """`model` (a loaded base) with the method applied: adapters swapped in, the base frozen (and stored in
    NF4 for qlora). `full` leaves every weight trainable.

    `wrap` puts the base inside a bigger module first (a reward model's scalar head): the parameters it adds
    are new, so they stay trainable and in fp32 whatever the method."""
    head: list[nn.Parameter] = []
    if wrap is not None:
        # Compared by identity with the base's parameters held alive: a dropped one (the reward model's
        # vocabulary head) freed here could hand its id() to a new parameter, which then passed for frozen
        # base weight on some runs and not others.
        base_params = list(model.parameters())
        model = wrap(model)
        head = [p for p in model.parameters() if not any(p is q for q in base_params)]
        del base_params
        for p in head:
            p.data = p.data.float()
    if method.method == "full":
        return model
    apply_lora(model, method.lora_spec(), seed=seed)
    for p in head:
        p.requires_grad_(True)
    if method.method == "qlora":
        quantize_base_(model, method.nf4_block_size)
    return model


def saved_module(model: nn.Module, method: str) -> nn.Module:
    """What a checkpoint holds: the whole model for full fine-tuning, else the trainable adapters alone."""
    return model if method == "full" else trainable_view(model)
