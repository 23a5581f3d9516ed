"""Data parallelism for commands that train a model loaded from a checkpoint (alignment): DDP, or ZeRO-3 with
FSDP2, over all ranks started by torchrun.

Every rank loads the same weights and data, so everything computed before wrapping (reference
log-probabilities, a frozen reference copy) is identical on every rank without communication. Each rank then
takes a contiguous slice of every global batch; the Trainer's collectives make the loss and gradients those
of the whole batch on one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cybertron.config import ParallelSection
from cybertron.errors import ConfigError
from cybertron.parallel.apply import parallelize
from cybertron.parallel.blocks import transformer_of
from cybertron.parallel.collectives import build_collectives
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv, init_distributed
from cybertron.train.trainer import Collectives

MODES = ("ddp", "zero3")
T = TypeVar("T")


@dataclass
class DataParallel:
    """This rank's place in a pure data-parallel world (world size 1: every method is an identity)."""

    env: DistEnv
    mode: str = "ddp"
    mesh: DeviceMesh | None = None
    device: torch.device = torch.device("cpu")  # where collectives take their tensors (CUDA under NCCL)

    @property
    def size(self) -> int:
        return self.env.world_size

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def is_distributed(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def from_main(self, value: str) -> str:
        """Rank 0's value on every rank (e.g. a timestamped run directory)."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def local_slice(self, n: int) -> slice:
        """This rank's contiguous share of n global rows (n is a multiple of the world size)."""
        per_rank = n // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def row_share(self, n: int) -> slice:
        """This rank's contiguous share of n rows for work split over ranks (the last shares may be short)."""
        per_rank = -(-n // self.size)
        return slice(min(self.rank * per_rank, n), min((self.rank + 1) * per_rank, n))

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's `row_share(n)` of a per-row tensor (on CPU), concatenated in rank order: (n, ...)."""
        if not self.is_distributed:
            return local
        per_rank = -(-n // self.size)
        padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[:n].cpu()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.is_distributed:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out

    def wrap(self, model: nn.Module, blocks_of: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """DDP around `model`, or FSDP2 over each transformer block, each other child of a wrapper (the reward
        model's score head) and the root: `parallelize()` with this world's pure data-parallel layout.
        The blocks are found in the module tree (parallel/blocks.py); `blocks_of` is kept for callers that
        still pass it and must name the same module."""
        if blocks_of is not None:
            assert blocks_of(model) is transformer_of(model), "blocks_of disagrees with the module tree"
        if not self.is_distributed:
            return model
        dims = ParallelDims.resolve(self.size, data_parallel=self.mode)
        # No start-up broadcast: every rank loaded the same weights and seeded the same adapters, and
        # broadcasting torchao's NF4 tensors (QLoRA) altered rank 1's base (the first loss and gradient
        # norms then differed from one process; bench/RESULTS.md).
        return parallelize(model, dims, self.mesh, ParallelSection(data_parallel=self.mode),
                           replicas_equal=True).model

    def collectives(self) -> Collectives:
        return build_collectives(self.mesh, self.size, 1) if self.is_distributed else Collectives()

    def devnull_unless_main(self):
        """Where non-main ranks print (nowhere): the progress lines come from rank 0 only."""
        return None if self.is_main else open(os.devnull, "w")  # noqa: SIM115 - lives as long as the run

    def shutdown(self, clean: bool = True) -> None:
        from cybertron.parallel.runtime import shutdown_distributed

        if self.is_distributed:
            shutdown_distributed(clean)


def validate_data_parallel(mode: str, world_size: int, global_batch: int, micro_batch: int) -> None:
    """Before any process group exists: the mode, and batches that split evenly over the ranks."""
    if mode not in MODES:
        raise ConfigError(f"parallel.data_parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if global_batch % world_size:
        raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by the {world_size} ranks")
    if micro_batch and (global_batch // world_size) % micro_batch:
        raise ConfigError(f"train.micro_batch_size={micro_batch} does not divide the per-rank batch "
                          f"{global_batch // world_size} (global batch {global_batch} over {world_size} ranks)")


def start_data_parallel(env: DistEnv, mode: str, device: torch.device, timeout_s: int) -> DataParallel:
    """Join the process group (gloo on CPU, NCCL on CUDA) when torchrun started several ranks."""
    if env.world_size == 1:
        return DataParallel(env, mode, device=device)
    dims = ParallelDims.resolve(env.world_size, data_parallel=mode)
    return DataParallel(env, mode, init_distributed(env, dims, device, timeout_s), device)


@contextlib.contextmanager
def distributed_run(dp: DataParallel):
    """Tear the process group down after the run: with a barrier when it ended well, without one after an
    error (the other ranks may be inside a collective; a failing rank must exit, not wait)."""
    try:
        yield dp
    except BaseException:
        dp.shutdown(clean=False)
        raise
    dp.shutdown()


def run_on_ranks(env: DistEnv, device_name: str, mode: str, timeout_s: int,
                 body: Callable[[DataParallel, torch.device], T]) -> T:
    """Run `body` on this rank: its device (cuda:LOCAL_RANK under torchrun), the process group joined when
    there are several ranks, and torn down afterwards."""
    from cybertron.train.precision import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    dp = start_data_parallel(env, mode, device, timeout_s)
    with distributed_run(dp):
        return body(dp, device)
