"""Where a model's transformer blocks are: the model itself when it has `layers` (a ModuleDict of blocks), else
the first submodule that does (a wrapper such as the reward model's score head around a Transformer).

Found from the module tree, not from a model's name, so every step of `parallelize()` (activation
checkpointing, compile, FSDP units, the tensor-parallel plan) sees the same blocks."""

from __future__ import annotations

from torch import nn


def transformer_of(model: nn.Module) -> nn.Module:
    """The module holding `layers`; ValueError when there is none."""
    for module in model.modules():  # the model itself first
        if isinstance(getattr(module, "layers", None), nn.ModuleDict):
            return module
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleDict of transformer blocks")
