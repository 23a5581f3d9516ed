"""Data parallelism: DDP, ZeRO-1/2 (ZeroRedundancyOptimizer), ZeRO-3 and HSDP (FSDP2), optional CPU offload.

ZeRO stage | what is sharded over data-parallel ranks | implementation                  | bytes/param (fp32 Adam)
0 (ddp)    | nothing                                  | DistributedDataParallel         | 16
1 (zero1)  | optimizer state                          | DDP + ZeroRedundancyOptimizer   | 4 + 4 + 8/N
2 (zero2)  | optimizer state, gradients               | Zero2Gradients (each gradient   | 4 + 12/N
           |                                          | reduced to its ZeRO owner only) |
           |                                          | + ZeroRedundancyOptimizer       |
3 (zero3)  | optimizer state, gradients, parameters   | fully_shard(reshard_after_fwd)  | 16/N
The paper's ZeRO-2 above is pure data parallelism (tp = pp = 1, one dp_shard dimension, no CPU offload).
zero2 composed with tp, pp, HSDP (dp_replicate > 1) or CPU offload is FSDP2 with reshard_after_forward=False
instead: it keeps the gathered parameters *and* FSDP2's fp32 shard, 4 + 16/N bytes per parameter.
HSDP is zero2/zero3 on a 2-D (dp_replicate, dp_shard) mesh: shard within a group, replicate across groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import Shard
from torch.nn.parallel import DistributedDataParallel

from cybertron.parallel.blocks import transformer_of
from cybertron.parallel.expert_parallel import is_expert_parallel
from cybertron.train.optim import param_groups


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, init_sync: bool = True) -> DistributedDataParallel:
    """Replicate `model` over dp_mesh; gradients are averaged by all-reduce in backward. init_sync=False skips
    the broadcast of rank 0's weights (for replicas that are equal by construction)."""
    device = next(model.parameters()).device
    # gradient_as_bucket_view: grads live inside the communication buckets, so DDP holds one copy (4 bytes
    # per parameter), which is what the ZeRO memory table assumes.
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, init_sync=init_sync)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool, cpu_offload: bool = False,
               param_dtype: torch.dtype | None = None, experts_mesh: DeviceMesh | None = None) -> nn.Module:
    """fully_shard every transformer block, then each other child of a wrapper model (e.g. a score head, its
    own unit), then the root (embedding, final norm, head).

    dp_mesh is 1-D (dp_shard: ZeRO-2/3) or 2-D (dp_replicate, dp_shard: HSDP). experts_mesh: under expert
    parallelism, the expert-parallel experts modules become FSDP units of their own over the data-parallel
    ranks expert parallelism does not use (efsdp, or dp_replicate x efsdp), before their blocks."""
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        # Compute in param_dtype, but reduce gradients in fp32 so accumulation does not lose precision.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        # pin_memory needs an accelerator; on a CPU-only machine pinned allocation fails.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    else:
        kwargs["offload_policy"] = OffloadPolicy()
    transformer = transformer_of(model)
    for block in transformer.layers.values():
        if experts_mesh is not None:
            _shard_experts(block, experts_mesh, kwargs)
        fully_shard(block, **kwargs)
    if transformer is not model:
        shards = dp_mesh.size(dp_mesh.ndim - 1)
        for child in model.children():
            if child is not transformer and any(True for _ in child.parameters()):
                fully_shard(child, shard_placement_fn=partial(_widest_dim, shards), **kwargs)
    fully_shard(model, **kwargs)
    return model


def _shard_experts(block: nn.Module, experts_mesh: DeviceMesh, kwargs: dict) -> None:
    for module in block.modules():
        if is_expert_parallel(module):
            fully_shard(module, **{**kwargs, "mesh": experts_mesh})


def _widest_dim(shards: int, param: nn.Parameter) -> Shard | None:
    # A scalar head's weight is (1, dim): split on dim 0, every rank but one would hold an empty shard;
    # split along its columns, each holds an equal part.
    return Shard(1) if param.dim() == 2 and param.shape[0] < shards else None


def build_zero1_optimizer(model: nn.Module, dp_mesh: DeviceMesh, lr: float, weight_decay: float,
                          betas: tuple[float, float], eps: float) -> ZeroRedundancyOptimizer:
    """AdamW whose state is partitioned over dp ranks; each rank updates its partition and broadcasts it."""
    groups = param_groups(model, weight_decay)
    first, rest = groups[0], groups[1:]
    opt = ZeroRedundancyOptimizer(first["params"], optimizer_class=torch.optim.AdamW,
                                  process_group=dp_mesh.get_group(), lr=lr, betas=betas, eps=eps,
                                  weight_decay=first["weight_decay"], foreach=True)
    for group in rest:
        opt.add_param_group(group)
    return opt


class Zero2Gradients:
    """The paper's ZeRO-2 gradient partitioning for replicated parameters (no wrapper around the model).

    During the backward of the last micro-batch, as each parameter's gradient is complete (a post-accumulate
    hook), it is summed onto the one rank whose ZeroRedundancyOptimizer partition owns that parameter,
    divided there by the dp size (gloo has no AVG), and dropped (grad = None) on every other rank. Between
    steps a rank thus holds only the gradients it updates: 4/N bytes per parameter. Earlier micro-batches
    accumulate locally (`no_sync`), like DDP's no_sync. The ZeRO optimizer then steps its partition and
    broadcasts the updated parameters, as for ZeRO-1."""

    def __init__(self, model: nn.Module, dp_mesh: DeviceMesh):
        self.group = dp_mesh.get_group()
        self.size = dp_mesh.size()
        self.rank = dp_mesh.get_local_rank()
        self.global_rank = [dist.get_global_rank(self.group, r) for r in range(self.size)]  # dp rank -> global
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.owner: dict[nn.Parameter, int] | None = None  # dp rank of each parameter, set by attach()
        self.reduce = True  # off during the micro-batches before the last
        with torch.no_grad():  # replicas start equal, as DDP makes them (a no-op when seeded alike)
            for p in self.params:
                dist.broadcast(p.detach(), src=self.global_rank[0], group=self.group)
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._reduce_to_owner)

    def attach(self, zero: ZeroRedundancyOptimizer) -> None:
        """Learn the partition from the optimizer itself: each rank marks the parameters of its local
        optimizer (`zero.optim`, an attribute without underscore that checkpoint.py relies on too), and a MAX
        all-reduce gives every rank the whole map. ZeroRedundancyOptimizer's own map, `_param_to_rank`, is
        private, so it is not used."""
        index = {p: i for i, p in enumerate(self.params)}
        owner = torch.full((len(self.params),), -1, dtype=torch.int64, device=self.params[0].device)
        for group in zero.optim.param_groups:
            for p in group["params"]:
                owner[index[p]] = self.rank
        dist.all_reduce(owner, op=dist.ReduceOp.MAX, group=self.group)
        if (owner < 0).any():
            raise RuntimeError("ZeRO-2: some parameters belong to no rank's optimizer partition")
        self.owner = {p: int(r) for p, r in zip(self.params, owner.tolist())}

    def _reduce_to_owner(self, p: torch.Tensor) -> None:
        if not self.reduce:
            return
        if self.owner is None:
            raise RuntimeError("ZeRO-2 gradients need their optimizer: call attach(ZeroRedundancyOptimizer)")
        owner = self.owner[p]
        dist.reduce(p.grad, dst=self.global_rank[owner], op=dist.ReduceOp.SUM, group=self.group)
        if owner == self.rank:
            p.grad.div_(self.size)
        else:
            p.grad = None

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Collectives.no_sync: reduce only in the last micro-batch's backward."""
        self.reduce = last
        try:
            yield
        finally:
            self.reduce = True


def build_zero2_optimizer(model: nn.Module, grads: Zero2Gradients, dp_mesh: DeviceMesh, lr: float,
                          weight_decay: float, betas: tuple[float, float], eps: float) -> ZeroRedundancyOptimizer:
    """ZeRO-1's partitioned AdamW, whose partition also decides which rank receives which gradient."""
    opt = build_zero1_optimizer(model, dp_mesh, lr, weight_decay, betas, eps)
    grads.attach(opt)
    return opt
