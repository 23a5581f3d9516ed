"""World: this rank's place in a run, for every training command (pretrain, finetune, align) at every world
size, one process included: the layout's degrees, the DeviceMesh, the device, and the few collectives a
recipe needs outside the Trainer (rank 0's run directory, barriers, the data-parallel share of a batch,
work split over all ranks before the model is wrapped).

Data-parallel ranks see different rows; the tensor- and pipeline-parallel ranks of one replica see the same
ones, so batches are sliced by the data-parallel rank, not the global one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from cybertron.parallel.dims import ParallelDims, dp_mesh
from cybertron.parallel.runtime import DistEnv, init_distributed, shutdown_distributed

T = TypeVar("T")


@dataclass
class World:
    env: DistEnv
    dims: ParallelDims
    mesh: DeviceMesh | None = None  # None: one process
    device: torch.device = torch.device("cpu")  # this rank's device; collectives take their tensors there

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

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: the mesh is laid out row-major over (pp,
        dp_replicate, dp_shard, cp, tp), so the global rank skips tp and cp ranks (they see the same rows) and
        wraps around every replica's pipeline (the same as the flattened "dp" mesh's local rank)."""
        return (self.rank // (self.dims.tp * self.dims.cp)) % self.dims.dp

    @property
    def cp_rank(self) -> int:
        """This rank's index among the context-parallel ranks sharing its rows (which sequence chunks it holds)."""
        return (self.rank // self.dims.tp) % self.dims.cp

    def describe(self) -> str:
        return f"{self.size} ranks ({self.dims.describe()})" if self.is_distributed else str(self.device)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. tokenizing into a shared cache), then the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def from_main(self, value: str) -> str:
        """Rank 0's value on every rank (e.g. a timestamped run directory)."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def local_slice(self, n: int) -> slice:
        """This data-parallel rank's contiguous share of n global rows (n is a multiple of the dp degree)."""
        per_rank = n // self.dp_size
        return slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)

    def row_share(self, n: int) -> slice:
        """This rank's contiguous share of n rows of work split over every rank (the last may be short)."""
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

    def sum_over_dp(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over data-parallel ranks (each replica's tp/pp ranks hold the same value)."""
        if not self.is_distributed:
            return t
        out = t.detach().clone()
        dist.all_reduce(out, group=dp_mesh(self.mesh).get_group())
        return out

    def same_over_tp(self, value: int) -> bool:
        """Whether every tensor-parallel rank of this replica holds `value` (e.g. a checksum of data that the
        tp ranks must share); True without tensor parallelism."""
        if not self.is_distributed or self.dims.tp == 1:
            return True
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.mesh["tp"].get_group())
        return int(both[0]) == value == -int(both[1])

def run_on_world(env: DistEnv, dims: ParallelDims, device_name: str, timeout_s: int,
                 body: Callable[[World], T]) -> T:
    """Run `body` on this rank: its device (cuda:LOCAL_RANK under torchrun), the process group and mesh built
    when there are several ranks, and torn down afterwards: with a barrier when the run ended well, without one
    after an error (the other ranks may be inside a collective; a failing rank must exit, not wait)."""
    from cybertron.train.precision import resolve_device

    device = resolve_device(device_name)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    mesh = init_distributed(env, dims, device, timeout_s)
    try:
        result = body(World(env, dims, mesh, device))
    except BaseException:
        shutdown_distributed(clean=False)
        raise
    shutdown_distributed()
    return result
