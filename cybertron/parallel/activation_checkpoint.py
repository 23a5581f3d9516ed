"""Activation checkpointing per transformer block: none, full (recompute the whole block in backward) or
selective (keep matmul and attention outputs, recompute the cheap elementwise ops and norms).

The block's forward is wrapped in place rather than the block in a wrapper module, so parameter names
(and so checkpoints and pipeline splits) are unchanged."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cybertron.parallel.blocks import transformer_of

MODES = ("none", "full", "selective")

# Ops whose outputs selective checkpointing keeps: the expensive ones (matmuls, attention).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def _checkpointed(forward: Callable, selective: bool) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if selective:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpoint(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every transformer block of `model` (see blocks.transformer_of) according to `mode`."""
    assert mode in MODES, mode
    if mode == "none":
        return model
    for block in transformer_of(model).layers.values():
        block.forward = _checkpointed(block.forward, selective=mode == "selective")
    return model
