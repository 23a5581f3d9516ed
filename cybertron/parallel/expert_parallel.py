"""Expert parallelism: each rank of an expert-parallel group holds n_experts / ep whole experts, and the tokens
routed to an expert travel to the rank that holds it and back, with two all-to-alls over plain
torch.distributed collectives (they run on gloo as on NCCL).

The MoE block routes its tokens, sorts them by expert and calls its experts module as
`experts(x_sorted, tokens_per_expert)`; under expert parallelism that call becomes

    dispatch:  exchange the counts (E ints per rank), then all-to-all the sorted tokens: rank r receives, from
               every rank, the tokens for its own experts; reorder them from source-rank-major to expert-major
    compute:   the local experts on their tokens (the experts module's own math, on the local weight slices)
    combine:   undo the reorder and all-to-all the results back, in the order the block sent them

so the block's routing, sorting and weighting are unchanged. Both all-to-alls are differentiable (the backward
of one is the all-to-all with the splits swapped). The experts' stacked weights are DTensors sharded Shard(0)
over the "ep" mesh dim, which is what lets FSDP2 shard them further over "efsdp" and DCP reshard a checkpoint
to another ep degree or to one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from cybertron.models.moe import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows in_splits[r] of x (in order) to rank r of group; receive out_splits[r] rows from rank r."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class Dispatched:
    """What combine() needs to send the results back: the splits of the first all-to-all and the reorder."""

    in_splits: list[int]  # rows this rank sent to each rank
    out_splits: list[int]  # rows this rank received from each rank
    order: torch.Tensor  # expert-major position -> position in the received (source-rank-major) rows


def dispatch(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
             group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
    """Send each token to the rank holding its expert (rank r holds experts [r*e, (r+1)*e), e = E / ep).

    x_sorted: (N, dim) this rank's tokens sorted by global expert; tokens_per_expert: (E,) their counts.
    Returns the tokens of this rank's e experts from every rank, sorted by local expert (M, dim), their
    counts (e,), and the plan for combine()."""
    ep = group.size()
    counts = tokens_per_expert.to(torch.int64).view(ep, -1)  # (ep, e): rows for each rank's experts
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # received[r, j]: rank r's tokens for my expert j
    in_splits = counts.sum(1).tolist()
    out_splits = received.sum(1).tolist()
    x_recv = all_to_all(x_sorted, out_splits, in_splits, group)  # (M, dim), by source rank, then expert
    order = _expert_major_order(received)
    return x_recv[order], received.sum(0), Dispatched(in_splits, out_splits, order)


def combine(y_local: torch.Tensor, plan: Dispatched, group: dist.ProcessGroup) -> torch.Tensor:
    """The local experts' outputs (M, dim), in dispatch()'s expert-major order, back to the ranks and
    positions their tokens came from: (N, dim) in the caller's x_sorted order."""
    y_recv = torch.empty_like(y_local).index_copy(0, plan.order, y_local)  # back to source-rank-major
    return all_to_all(y_recv, plan.in_splits, plan.out_splits, group)


def _expert_major_order(received: torch.Tensor) -> torch.Tensor:
    """Indices that reorder rows laid out (rank 0: expert 0, 1, ..; rank 1: expert 0, 1, ..; ...) into
    (expert 0: rank 0, 1, ..; expert 1: rank 0, 1, ..; ...); `received` is the (ep, e) count matrix."""
    starts = (received.flatten().cumsum(0) - received.flatten()).view_as(received)  # where each block starts
    lengths = received.t().flatten()  # blocks in expert-major order
    block_starts = starts.t().flatten()
    block = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    offset_in_block = torch.arange(block.numel(), device=lengths.device) - (lengths.cumsum(0) - lengths)[block]
    return block_starts[block] + offset_in_block


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`.

    An expert's gradient already sums the tokens of its whole expert-parallel group (they reached it through
    the all-to-all), so FSDP2, which averages over the efsdp ranks only, would leave it ep times too large
    against every other gradient (averaged over all dp = efsdp x ep ranks). FSDP2's own
    set_gradient_divide_factor would do this with ReduceOp.PREMUL_SUM, which gloo lacks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class ExpertParallel:
    """Mixed into an experts module's class by apply_expert_parallel (as fully_shard mixes in FSDPModule):
    forward dispatches, runs the module's own forward on a weightless twin that holds this rank's weight
    slices as plain tensors, and combines. Parameter names and the module tree are unchanged."""

    ep_group: dist.ProcessGroup
    _twin: nn.Module

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        x_local, local_counts, plan = dispatch(x, tokens_per_expert, self.ep_group)
        twin = self._twin
        twin.train(self.training)
        slots = []
        for fqn, param in self.named_parameters():
            # the unsharded DTensor (FSDP2 gathers it over efsdp before forward); to_local keeps the graph.
            # Set as a plain attribute: nn.Module would register a Parameter as one of the twin's own.
            owner, _, name = fqn.rpartition(".")
            slot = vars(twin.get_submodule(owner))
            local = param.to_local() if isinstance(param, DTensor) else param
            slot[name] = _ScaleGrad.apply(local, 1.0 / self.ep_group.size())
            slots.append((slot, name))
        try:
            y_local = twin(x_local, local_counts)
        finally:
            for slot, name in slots:
                del slot[name]
        return combine(y_local, plan, self.ep_group)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # parameters, buffers, submodules, hooks, training


def _weightless_twin(module: nn.Module) -> nn.Module:
    """A module of the same class and tree as `module`, sharing its buffers and plain attributes, without
    parameters or hooks (so FSDP2's and this file's hooks do not run on it)."""
    twin = type(module).__new__(type(module))
    nn.Module.__init__(twin)
    vars(twin).update({k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS})
    for name, buffer in module.named_buffers(recurse=False):
        twin.register_buffer(name, buffer)
    for name, child in module.named_children():
        twin.add_module(name, _weightless_twin(child))
    return twin


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> list[nn.Module]:
    """Shard every experts module's stacked weights (n_experts, ...) Shard(0) over ep_mesh (its whole subtree:
    a subclass's per-expert adapters too) and route its tokens through dispatch/combine; returns the experts
    modules (for FSDP2 over the efsdp ranks)."""
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for module in experts:
        twin = _weightless_twin(module)
        for fqn, param in list(module.named_parameters()):
            owner, _, name = fqn.rpartition(".")
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)])
            module.get_submodule(owner).register_parameter(
                name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        cls = type(module)
        module.__class__ = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
        module.ep_group = ep_mesh.get_group()
        object.__setattr__(module, "_twin", twin)  # not a submodule: it must not appear in state dicts
    return experts


def is_expert_parallel(module: nn.Module) -> bool:
    return isinstance(module, ExpertParallel)
