"""What the Trainer needs from a distributed layout: sums over data-parallel ranks, the true global
gradient norm (over DTensor shards, ZeRO-2 gradient partitions and pipeline stages) with clipping, and
DDP's (or ZeRO-2's) no_sync."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.parallel import DistributedDataParallel

from cybertron.parallel.data_parallel import Zero2Gradients
from cybertron.parallel.dims import dp_cp_mesh
from cybertron.train.trainer import Collectives


def sum_over(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    def reduce(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    return reduce


def _sharded_dims(grad: DTensor) -> tuple[int, ...]:
    # Mesh dims over which this gradient is split (Shard, or FSDP x TP's _StridedShard, for which
    # is_shard() is False): there the squares add up across ranks. Over Replicate dims every rank holds the
    # same values and nothing is summed.
    return tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())


def global_grad_norm(params: list[torch.Tensor], pp_group: dist.ProcessGroup | None,
                     plain_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """L2 norm of all gradients of the whole model, whichever rank holds which piece.

    Squares are summed locally per (mesh, sharded dims) bucket, then all-reduced once per bucket and dim;
    plain tensors are replicated (DDP) and need no reduction, unless plain_group is given: then each rank
    holds a disjoint part of them (ZeRO-2's owned gradients) and their sums are added over it; pipeline
    stages hold disjoint parameters, so their sums are added over the pp group."""
    buckets: dict[tuple, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float32))
    device = None
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            # a pending sum: squares of the pieces do not add up to the square of the sum, so reduce first
            g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
        local = g.to_local() if isinstance(g, DTensor) else g
        device = local.device
        key = (g.device_mesh, _sharded_dims(g)) if isinstance(g, DTensor) else (None, ())
        sq = local.detach().float().pow(2).sum()
        buckets[key] = buckets[key].to(sq.device) + sq
    if device is None and params:  # this rank holds no gradient (a ZeRO-2 rank may own none)
        device = params[0].device
    if plain_group is not None:  # every rank joins the all-reduce, whether it holds gradients or not
        buckets[(None, ())] = buckets[(None, ())].to(device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (mesh, dims), sq in buckets.items():
        for dim in dims:
            dist.all_reduce(sq, group=mesh.get_group(dim))
        if mesh is None and plain_group is not None:
            dist.all_reduce(sq, group=plain_group)
        total = total + sq.to(total.device)
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grads_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradients in place as torch.nn.utils.clip_grad_norm_ does, on local shards."""
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            local.mul_(coef.to(local.device))


def _ddp_no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    # Skip DDP's all-reduce on every micro-batch but the last: the gradients accumulate locally first.
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def build_collectives(mesh: DeviceMesh, dp_size: int, pp: int,
                      step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                      zero2: Zero2Gradients | None = None, cp: int = 1) -> Collectives:
    """dp_size: the ranks holding different tokens (dp x cp), over which losses and units are summed.
    zero2: the paper's ZeRO-2 gradient partitioning, whose no_sync and owned-gradient norm are used."""
    pp_group = mesh["pp"].get_group() if pp > 1 else None
    dp_group = dp_cp_mesh(mesh).get_group()
    plain_group = dp_group if zero2 is not None else None

    def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        norm = global_grad_norm(params, pp_group, plain_group)
        if max_norm > 0:
            clip_grads_(params, max_norm, norm)
        return norm

    no_sync = zero2.no_sync if zero2 is not None else _ddp_no_sync
    return Collectives(dp_size=dp_size, row_share=cp, sum_over_dp=sum_over(dp_group), clip_grad_norm=clip,
                       no_sync=no_sync, step_context=step_context)
