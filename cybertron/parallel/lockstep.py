"""Inference on weights that FSDP2 shards over the data-parallel ranks, each rank with its own work.

A fully_shard'ed module gathers its weights in its forward pre-hook and frees them after (ZeRO-3), so every
forward is a sequence of all-gathers that each rank of the shard group must join, in the same order. Ranks that
generate different prompts make different numbers of model calls (continuous batching: different lengths,
prefill and decode batches). `ShardedLockstep` evens them out, as serve.engine.Lockstep asks: before its
calls of a step, each rank learns the most calls any rank makes (a MAX all-reduce of one integer) and runs
the missing ones as idle forwards on a one-token placeholder. Activation shapes may differ between ranks:
the gathers depend on the weights only."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ShardedLockstep:
    """serve.engine.Lockstep over `group` (the data-parallel ranks) for `model`, called on `device`."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup, device: torch.device):
        self.model, self.group, self.device = model, group, device
        self.idle_forwards = 0  # how many calls this rank made without work (for tests and curiosity)

    def agree(self, forwards: int) -> int:
        count = torch.tensor([forwards], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return int(count.item())

    def idle_forward(self) -> None:
        self.idle_forwards += 1
        self.model(torch.zeros((1, 1), dtype=torch.long, device=self.device))
