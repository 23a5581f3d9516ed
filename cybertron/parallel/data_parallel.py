"""Data parallelism: DDP, ZeRO-1 (ZeroRedundancyOptimizer), ZeRO-2/3 and HSDP (FSDP2), optional CPU offload.

ZeRO stage | what is sharded over data-parallel ranks          | implementation
0 (ddp)    | nothing                                           | DistributedDataParallel
1 (zero1)  | optimizer state                                   | DDP + ZeroRedundancyOptimizer
2 (zero2)  | optimizer state, gradients (params kept gathered  | fully_shard(reshard_after_forward=False)
           | from forward to backward)                         |
3 (zero3)  | optimizer state, gradients, parameters            | fully_shard(reshard_after_forward=True)
HSDP is zero2/zero3 on a 2-D (dp_replicate, dp_shard) mesh: shard within a group, replicate across groups.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from cybertron.train.optim import param_groups


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """Replicate `model` over dp_mesh; gradients are averaged by all-reduce in backward."""
    device = next(model.parameters()).device
    # gradient_as_bucket_view: grads live inside the communication buckets, so DDP holds one copy (4 bytes
    # per parameter), which is what the ZeRO memory table assumes.
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, reshard_after_forward: bool, cpu_offload: bool = False,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard every transformer block, then the root (embedding, final norm, head).

    dp_mesh is 1-D (dp_shard: ZeRO-2/3) or 2-D (dp_replicate, dp_shard: HSDP)."""
    kwargs = {"mesh": dp_mesh, "reshard_after_forward": reshard_after_forward}
    if param_dtype is not None:
        # Compute in param_dtype, but reduce gradients in fp32 so accumulation does not lose precision.
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        # pin_memory needs an accelerator; on a CPU-only machine pinned allocation fails.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    else:
        kwargs["offload_policy"] = OffloadPolicy()
    layers = getattr(model, "layers", None)
    for block in (layers.values() if layers is not None else []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


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
