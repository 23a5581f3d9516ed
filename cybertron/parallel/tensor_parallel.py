"""Tensor (and sequence) parallelism: apply a model family's plan (FQN pattern -> ParallelStyle, see
parallel/plans.py) to a plain model, plus the loss-parallel cross-entropy step for vocabulary-sharded logits.

A plan names linear layers. A module swapped in for one (a LoRA/DoRA adapter layer holding the base weight
plus its low-rank factors) keeps the name, so the plan's pattern still matches it; what the module declares
in `param_axes` (parameter name -> the role of each dimension: "out", "in" or anything else) decides how each
parameter is split. Under a column-parallel style every parameter with an "out" dimension is sharded along it
(base weight and bias, LoRA B, the DoRA magnitude) and the rest replicated (LoRA A); under a row-parallel
style every parameter with an "in" dimension is sharded along it (base weight, LoRA A) and the rest
replicated (LoRA B, bias, magnitude), and the partial sums of the base and low-rank paths are reduced
together by the style's output redistribution. Nothing is keyed on a model's or a layer's name."""

from __future__ import annotations

import fnmatch
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from cybertron.train.losses import IGNORE_INDEX
from cybertron.train.trainer import Batch, LanguageModelStep


def present_plan(model: nn.Module, plan: dict[str, ParallelStyle]) -> dict[str, ParallelStyle]:
    """The entries of `plan` that match a module of `model` (a pipeline stage lacks embed/norm/head)."""
    names = [name for name, _ in model.named_modules()]
    return {pattern: style for pattern, style in plan.items()
            if any(fnmatch.fnmatchcase(name, pattern) for name in names)}


def resolve_plan(model: nn.Module, plan: dict[str, ParallelStyle],
                 float8: bool = False) -> dict[str, ParallelStyle]:
    """The plan for this very model: patterns that match nothing dropped, and every module that declares
    `param_axes` (an adapter layer in place of a Linear) given the adapter form of its pattern's style.

    float8: every torchao Float8Linear gets the float8 form of its style (its input cast to float8 before
    the all-gather, its output's gradient cast in backward), and so does a module preparing the input of
    Linears that are all float8 (q/k/v share one float8 all-gather of the sequence-parallel stream)."""
    resolved: dict[str, ParallelStyle] = {}
    for pattern, style in present_plan(model, plan).items():
        matched = [(name, module) for name, module in model.named_modules() if fnmatch.fnmatchcase(name, pattern)]
        styles = {name: _module_style(module, style, float8) for name, module in matched}
        if all(s is style for s in styles.values()):
            resolved[pattern] = style
        else:
            resolved.update(styles)
    return resolved


def _module_style(module: nn.Module, style: ParallelStyle, float8: bool) -> ParallelStyle:
    if hasattr(module, "param_axes"):
        return adapter_style(style)
    if float8:
        from cybertron.parallel.float8_tp import float8_style

        return float8_style(module, style)
    return style


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, ParallelStyle],
                          float8: bool = False) -> nn.Module:
    """Shard `model`'s existing weights over tp_mesh as the plan says (the model code is unchanged: attention
    infers its local head count from the sharded projection shapes). Frozen parameters stay frozen: some
    of torch's styles (SequenceParallel) re-register the norms' weights as new, trainable Parameters.
    float8: use torchao's float8 styles for Float8Linear layers (tensorwise recipe; see resolve_plan)."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    parallelize_module(model, tp_mesh, resolve_plan(model, plan, float8))
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


def adapter_style(style: ParallelStyle) -> ParallelStyle:
    """The column- or row-parallel style for a module declaring `param_axes`, with the same layouts."""
    kind = type(style)
    if kind not in (ColwiseParallel, RowwiseParallel):
        raise NotImplementedError(f"{kind.__name__} has no form for adapter layers (only Colwise/Rowwise)")
    adapted = AdapterColwise if kind is ColwiseParallel else AdapterRowwise
    return adapted(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                   use_local_output=style.use_local_output)


def _shard_by_role(role: str, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """Shard each parameter of `module` along its dimension named `role` ("out"/"in"); replicate the rest.
    requires_grad is kept, so a frozen base stays frozen."""
    axes: dict[str, tuple[str, ...]] = getattr(module, "param_axes", {})
    for pname, param in list(module.named_parameters(recurse=False)):
        dims = axes.get(pname)
        if dims is None:
            raise ValueError(f"{type(module).__name__}.param_axes does not name its parameter {pname!r}")
        placement = Shard(dims.index(role)) if role in dims else Replicate()
        module.register_parameter(pname, nn.Parameter(distribute_tensor(param, mesh, [placement]),
                                                      requires_grad=param.requires_grad))


class AdapterColwise(ColwiseParallel):
    """ColwiseParallel for a module declaring `param_axes`: parameters split along their "out" dimension."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, partial(_shard_by_role, "out"),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class AdapterRowwise(RowwiseParallel):
    """RowwiseParallel for a module declaring `param_axes`: parameters split along their "in" dimension;
    the output (a partial sum of base and low-rank paths) is reduced by the output layout."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)  # as RowwiseParallel for a Linear: the input's last dim split
        return distribute_module(
            module, device_mesh, partial(_shard_by_role, "in"),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def sharded_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy of vocabulary-sharded DTensor logits; call inside `loss_parallel()`.
    The full (tokens x vocab) logits are never gathered on one rank."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def sharded_next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """(B, T-1) fp32 log p(ids[:, t+1] | ids[:, :t+1]) as a plain, replicated tensor, from vocabulary-sharded
    DTensor logits (B, T, V); call inside `loss_parallel()`, forward and backward (the Trainer's step
    context). Through torch's loss-parallel cross-entropy: each rank's log-softmax shard is normalised by a
    logsumexp over the tensor-parallel group and each target's logit comes from the rank owning it, so the
    (tokens x vocab) logits are never gathered; chunked over rows like train.losses.next_token_logprobs."""
    targets = ids[:, 1:]
    logits = logits[:, :-1]
    parts = []
    for chunk, chunk_targets in zip(logits.split(chunk_rows), targets.split(chunk_rows)):
        flat = chunk.float().flatten(0, 1)
        nll = F.cross_entropy(flat, chunk_targets.reshape(-1), reduction="none")
        parts.append(-nll.full_tensor().view(chunk_targets.shape))
    return torch.cat(parts)


class LossParallelStep(LanguageModelStep):
    """Next-token prediction whose logits arrive sharded over the vocabulary (lm_head with Shard(-1))."""

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(batch["inputs"], positions=batch.get("positions"))
        return sharded_cross_entropy_sum(logits, batch["labels"]), {}


def loss_parallel_context():
    """Context for forward and backward of a loss-parallel step (the backward must run inside it too)."""
    return loss_parallel()
