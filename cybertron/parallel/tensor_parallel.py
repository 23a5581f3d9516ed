"""Tensor (and sequence) parallelism: apply a model family's plan (FQN pattern -> ParallelStyle, see
parallel/plans.py) to a plain model, plus the loss-parallel cross-entropy step for vocabulary-sharded logits."""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel, parallelize_module

from cybertron.train.losses import IGNORE_INDEX
from cybertron.train.trainer import Batch, LanguageModelStep


def present_plan(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The entries of `plan` that match a module of `model` (a pipeline stage lacks embed/norm/head)."""
    names = [name for name, _ in model.named_modules()]
    return {pattern: style for pattern, style in plan.items()
            if any(fnmatch.fnmatchcase(name, pattern) for name in names)}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> nn.Module:
    """Shard `model`'s existing weights over tp_mesh as the plan says (the model code is unchanged: attention
    infers its local head count from the sharded projection shapes)."""
    return parallelize_module(model, tp_mesh, present_plan(model, plan))


def sharded_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of vocabulary-sharded DTensor logits; call inside `loss_parallel()`.
    The full (tokens x vocab) logits are never gathered on one rank."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


class LossParallelStep(LanguageModelStep):
    """Next-token prediction whose logits arrive sharded over the vocabulary (lm_head with Shard(-1))."""

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["inputs"], positions=batch.get("positions"))
        return sharded_cross_entropy_sum(logits, batch["labels"]), {}


def loss_parallel_context():
    """Context for forward and backward of a loss-parallel step (the backward must run inside it too)."""
    return loss_parallel()
