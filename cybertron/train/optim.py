"""AdamW with decay only on matrices that do work: norms, biases and embeddings are not decayed."""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():  # parameters() yields a tied weight once
        if not param.requires_grad:
            continue
        if param.dim() < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An empty group (LoRA adapters are all matrices) breaks DCP's flattened optimizer state on load.
    return [g for g in groups if g["params"]]


def _fused_available(model: nn.Module) -> bool:
    # Fused AdamW runs one kernel for all parameters. It exists for CUDA and CPU tensors in torch >= 2.4,
    # but not for every tensor subclass (e.g. DTensor on some backends), so we probe instead of assuming.
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return False
    device_type = params[0].device.type
    return device_type in ("cuda", "cpu") and all(type(p.data) is torch.Tensor for p in params)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, fused: bool | None = None) -> torch.optim.AdamW:
    if fused is None:
        fused = _fused_available(model)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused,
                             foreach=None if fused else True)


class PartsOptimizer:
    """One optimizer per model part (pipeline stages held by one rank), stepped together.

    Checkpoints pair each part with its optimizer, so parameter names stay those of the whole model."""

    def __init__(self, parts: list[tuple[nn.Module, torch.optim.Optimizer]]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for _, opt in self.parts for group in opt.param_groups]

    def step(self) -> None:
        for _, opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)
