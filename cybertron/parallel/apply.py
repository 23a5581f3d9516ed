"""parallelize(model, dims, mesh, cfg): the one way every command applies a layout to a plain, initialised
model, at every world size, in the order

    converters (fp8, NF4) -> TP (+SP) -> EP -> activation checkpointing -> compile -> FSDP2 / DDP / ZeRO

(each step sees the modules the previous one made), with pipeline stages split off after the converters when
pp > 1. Without a mesh (one process) it returns the model with the converters, activation checkpointing and
compile applied, and the Trainer's single-process collectives."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from cybertron.config import ParallelSection, TrainSection
from cybertron.parallel.activation_checkpoint import apply_activation_checkpoint
from cybertron.parallel.blocks import transformer_of
from cybertron.parallel.collectives import build_collectives
from cybertron.parallel.context_parallel import (
    ContextParallelAttention,
    ContextParallelStep,
    apply_context_parallel,
)
from cybertron.parallel.data_parallel import (
    Zero2Gradients,
    apply_ddp,
    apply_fsdp,
    build_zero1_optimizer,
    build_zero2_optimizer,
)
from cybertron.parallel.dims import ParallelDims, dp_cp_mesh, dp_mesh, dp_shard_cp_mesh
from cybertron.parallel.expert_parallel import apply_expert_parallel
from cybertron.parallel.pipeline import (
    SCHEDULES,
    PipelineLoop,
    PipelineLoss,
    build_schedule,
    build_stage_module,
    local_stage_ids,
    split_layers,
)
from cybertron.parallel.plans import llama_tp_plan
from cybertron.parallel.tensor_parallel import (
    LossParallelStep,
    apply_tensor_parallel,
    loss_parallel_context,
    sharded_cross_entropy_sum,
)
from cybertron.train.float8 import (
    convert_to_float8,
    float8_all_gather_supported,
    float8_compile_options,
    precompute_float8_scales,
)
from cybertron.train.losses import cross_entropy_sum
from cybertron.train.optim import PartsOptimizer, build_optimizer, param_groups
from cybertron.train.trainer import Collectives, ForwardBackward, LanguageModelStep, StepFunction


@dataclass
class Parallelized:
    model: nn.Module  # what the Trainer calls and trains (a ModuleList of this rank's stages under PP)
    parts: list[nn.Module]  # modules whose state dicts make up (this rank's share of) the model's
    step_fn: StepFunction
    collectives: Collectives
    strategy: ForwardBackward | None  # None: the Trainer's default micro-batch loop
    zero2: Zero2Gradients | None = None  # the paper's ZeRO-2 (its optimizer learns the partition)
    context: ContextParallelAttention | None = None  # under cp: a method's own step function needs wrap_step

    def wrap_step(self, step_fn: StepFunction) -> StepFunction:
        """A method's step function made to run on this layout (context parallelism slices its batches, or
        the step cuts them itself when it defines `under_context_parallel(attention)`: the preference losses,
        which need whole-sequence sums)."""
        if self.context is None:
            return step_fn
        own = getattr(step_fn, "under_context_parallel", None)
        return own(self.context) if own is not None else ContextParallelStep(step_fn, self.context)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelSection,
                compile_blocks: bool = False, param_dtype: torch.dtype | None = None,
                converters: Sequence[Callable[[nn.Module], object]] = (),
                replicas_equal: bool = False, fp8: str = "none", fused_loss: bool = False,
                fp8_emulate: bool = False) -> Parallelized:
    """Apply the layout `dims` over `mesh` (None: one process) to `model`, in place where possible.

    converters: in-place module swaps run first (fp8 Linears, an NF4 base), so every later step wraps the
    converted modules. replicas_equal: every rank built bitwise-equal weights (loaded the same checkpoint,
    seeded the same adapters), so DDP skips its start-up broadcast (which altered torchao NF4 bases).

    fp8: train.fp8's recipe. The Linears become torchao Float8Linear first; with tensorwise scaling FSDP2
    all-gathers their weights in float8 (scales precomputed from the whole weights) and tensor
    parallelism uses torchao's float8 styles; rowwise weights are all-gathered in high precision
    (train/float8.py: float8_all_gather_supported). fp8_emulate: torchao's emulation (tests on CPU).
    fused_loss: the output head and the cross-entropy chunk by chunk inside the model's forward; under
    tensor parallelism with loss_parallel on a vocabulary-shard head (never the full logits), else on the
    gathered head."""
    assert not ((fp8 != "none" or fused_loss) and dims.pp > 1), "validate() refuses fp8 / fused_loss with pp"
    fsdp = mesh is not None and shards_parameters(dims, cfg)
    float8_gather = fp8 != "none" and fsdp and float8_all_gather_supported(fp8)
    if fp8 != "none":
        convert_to_float8(model, fp8, fsdp_float8_all_gather=float8_gather, emulate=fp8_emulate)
    for convert in converters:
        convert(model)
    compile_options = float8_compile_options(fp8) if fp8 != "none" else {}
    if mesh is None:
        _checkpoint_and_compile(model, cfg, compile_blocks, compile_options)
        return Parallelized(model, [model], LanguageModelStep(fused_loss=fused_loss), Collectives(), None)
    tp_on, lp = dims.tp > 1, dims.tp > 1 and cfg.loss_parallel
    sp = tp_on and cfg.sequence_parallel
    stages = _split(model, dims, cfg, mesh) if dims.pp > 1 else {0: model}
    context = apply_context_parallel(model, mesh["cp"].get_group()) if dims.cp > 1 else None
    n_stages = dims.pp * cfg.pp_virtual_stages if dims.pp > 1 else 1
    for stage, part in stages.items():
        if tp_on:
            float8_tp = fp8 != "none" and float8_all_gather_supported(fp8)
            _tensor_parallel(part, mesh["tp"], _tp_plan(model, sp, lp), float8=float8_tp)
            if dims.pp > 1:
                _local_stage_io(part, mesh["tp"], first=stage == 0, sp=sp)
        if dims.ep > 1:
            apply_expert_parallel(part, mesh["ep"])
        _checkpoint_and_compile(part, cfg, compile_blocks, compile_options)
        stages[stage] = _apply_data_parallel(part, dims, mesh, cfg, param_dtype, replicas_equal)
    zero2 = Zero2Gradients(stages[0], dp_mesh(mesh)) if paper_zero2(dims, cfg) else None
    step_context = loss_parallel_context if lp else contextlib.nullcontext
    collectives = build_collectives(mesh, dims.dp_cp, dims.pp, step_context, zero2, cp=dims.cp)
    if fused_loss:
        step_fn = LanguageModelStep(fused_loss=True, vocab_parallel=lp)
    else:
        step_fn = LossParallelStep() if lp else LanguageModelStep()
    if context is not None:
        step_fn = ContextParallelStep(step_fn, context)
    if float8_gather:
        _precompute_scales_before_forward(stages[0])
    if dims.pp == 1:
        return Parallelized(stages[0], [stages[0]], step_fn, collectives, None, zero2, context)
    strategy = _pipeline_strategy(stages, n_stages, dims, mesh, cfg, lp, sp, model.config.dim)
    return Parallelized(nn.ModuleList(stages.values()), list(stages.values()), step_fn, collectives, strategy)


def _tp_plan(model: nn.Module, sp: bool, lp: bool) -> dict:
    """The family's plan for this model's shape: which of its layers are mixtures of experts."""
    cfg = transformer_of(model).config
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    return llama_tp_plan(sp, lp, moe, cfg.n_layers, cfg.sandwich_norms)


def _tensor_parallel(part: nn.Module, tp_mesh: DeviceMesh, plan: dict, float8: bool = False) -> None:
    """The plan applies to the module holding the blocks. When that is a backbone inside a wrapper (the reward
    model's score head around a Transformer without lm_head), the wrapper's own modules stay whole and
    replicated, and the backbone hands them its hidden states gathered whole: under sequence parallelism
    they arrive split over the sequence, and a head reading the last real token needs every position."""
    backbone = transformer_of(part)
    apply_tensor_parallel(backbone, tp_mesh, plan, float8=float8)
    if backbone is not part:
        backbone.register_forward_hook(
            lambda _mod, _args, out: out.full_tensor() if isinstance(out, DTensor) else out)


def _checkpoint_and_compile(part: nn.Module, cfg: ParallelSection, compile_blocks: bool,
                            compile_options: dict[str, bool]) -> None:
    apply_activation_checkpoint(part, cfg.activation_checkpoint)
    if compile_blocks:
        for block in transformer_of(part).layers.values():
            block.compile(options=compile_options)  # in place: parameter names stay those of the plain model


def _precompute_scales_before_forward(model: nn.Module) -> None:
    """Before each forward of the root, the scales of all float8 weights from the whole weights in one
    all-reduce (torchao's precompute_float8_dynamic_scale_for_fsdp), which FSDP2's float8 all-gathers then
    use. Without them each rank scales its own shard by the maximum over the data-parallel ranks only, which
    under FSDP2 + TP is a tensor-parallel shard's maximum, not the weight's (one process would scale
    differently). torchtitan runs it after each optimizer step; before each forward it cannot go stale,
    whichever optimizer, checkpoint load or weight tying changed the weights, for one small all-reduce per
    micro-batch."""
    model.register_forward_pre_hook(lambda module, args: precompute_float8_scales(module), prepend=True)


def paper_zero2(dims: ParallelDims, cfg: ParallelSection) -> bool:
    """zero2 as in the ZeRO paper (replicated parameters, partitioned gradients and optimizer state) for
    pure data parallelism; composed with tp, pp, ep, HSDP or CPU offload, zero2 is FSDP2 without resharding."""
    return (dims.data_parallel == "zero2" and dims.dp > 1 and dims.tp == 1 and dims.pp == 1
            and dims.dp_replicate == 1 and dims.ep == 1 and dims.cp == 1 and not cfg.cpu_offload)


def shards_parameters(dims: ParallelDims, cfg: ParallelSection) -> bool:
    """Whether a multi-process layout's data parallelism is FSDP2 (zero3, HSDP, zero2 in its composed form):
    the weights are split over ranks and every forward gathers them, a collective all ranks must join."""
    return (not paper_zero2(dims, cfg) and dims.data_parallel in ("zero2", "zero3")
            and (dims.dp_cp > 1 or cfg.cpu_offload))


def shard_frozen(module: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None, cfg: ParallelSection,
                 param_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen module beside the trained one (GRPO's KL reference) sharded as the trained one is: split over
    the tp ranks, and under FSDP2 layouts over the dp ranks too, gathered block by block in each forward. It
    has no gradients to reduce, so under DDP it stays whole. Pipeline stages are not supported here."""
    if mesh is None:
        return module
    if dims.tp > 1:
        apply_tensor_parallel(module, mesh["tp"], _tp_plan(module, cfg.sequence_parallel, cfg.loss_parallel))
    if not shards_parameters(dims, cfg):
        return module
    return apply_fsdp(module, _shard_mesh(dims, mesh), reshard_after_forward=True, cpu_offload=cfg.cpu_offload,
                      param_dtype=param_dtype)


def _shard_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    # (Under HSDP with expert parallelism "dp_shard" is a flattened dim: torch warns that slicing it from the
    # root mesh will be deprecated, but it is the only 2-D mesh FSDP2's HSDP takes.)
    # Under context parallelism the cp ranks shard the parameters too (torchtitan's dp_shard_cp).
    shard = "dp_shard_cp" if dims.cp > 1 else "dp_shard"
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else dp_shard_cp_mesh(mesh)


def _experts_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh | None:
    """Where the expert-parallel experts are FSDP-sharded: the data-parallel ranks outside their ep group."""
    if dims.ep == 1:
        return None
    return mesh["dp_replicate", "efsdp"] if dims.dp_replicate > 1 else mesh["efsdp"]


def _apply_data_parallel(part: nn.Module, dims: ParallelDims, mesh: DeviceMesh, cfg: ParallelSection,
                         param_dtype: torch.dtype | None, replicas_equal: bool = False) -> nn.Module:
    if paper_zero2(dims, cfg):
        return part  # replicated parameters; Zero2Gradients partitions the gradients
    if shards_parameters(dims, cfg):
        return apply_fsdp(part, _shard_mesh(dims, mesh), reshard_after_forward=dims.data_parallel == "zero3",
                          cpu_offload=cfg.cpu_offload, param_dtype=param_dtype,
                          experts_mesh=_experts_mesh(dims, mesh))
    if dims.data_parallel in ("ddp", "zero1") and dims.dp_cp > 1:
        return apply_ddp(part, dp_cp_mesh(mesh), init_sync=not replicas_equal)
    return part


def _split(model: nn.Module, dims: ParallelDims, cfg: ParallelSection, mesh: DeviceMesh) -> dict[int, nn.Module]:
    n_stages = dims.pp * cfg.pp_virtual_stages
    layers = split_layers(model.config.n_layers, n_stages)
    style = SCHEDULES[cfg.pp_schedule].style
    ids = local_stage_ids(mesh["pp"].get_local_rank(), dims.pp, cfg.pp_virtual_stages, style)
    return {s: build_stage_module(model, s, n_stages, layers[s]) for s in sorted(ids)}


def _local_stage_io(part: nn.Module, tp_mesh: DeviceMesh, first: bool, sp: bool) -> None:
    """Stages exchange plain tensors: with sequence parallelism a stage receives its sequence shard and
    re-wraps it as a DTensor (so the model sees global shapes), and every stage hands back local tensors."""
    if sp and not first:
        part.register_forward_pre_hook(
            lambda _mod, args: (DTensor.from_local(args[0], tp_mesh, [Shard(1)], run_check=False), *args[1:]))
    part.register_forward_hook(lambda _mod, _args, out: out.to_local() if isinstance(out, DTensor) else out)


def _pipeline_strategy(stages: dict[int, nn.Module], n_stages: int, dims: ParallelDims, mesh: DeviceMesh,
                       cfg: ParallelSection, lp: bool, sp: bool, dim: int) -> PipelineLoop:
    tp_mesh = mesh["tp"]
    device = next(next(iter(stages.values())).parameters()).device
    if lp:
        loss_fn = PipelineLoss(lambda out: DTensor.from_local(out, tp_mesh, [Shard(2)], run_check=False),
                               sharded_cross_entropy_sum)
    else:
        loss_fn = PipelineLoss(loss_sum=cross_entropy_sum)
    pp_group = mesh["pp"].get_group()
    from torch.distributed.pipelining import PipelineStage  # lazily, as parallel/pipeline.py says why

    pipeline_stages = [PipelineStage(part, s, n_stages, device, group=pp_group) for s, part in stages.items()]
    n_micro = cfg.pp_microbatches or n_stages
    schedule = build_schedule(cfg.pp_schedule, pipeline_stages, n_micro, loss_fn)
    seq_div = dims.tp if sp else 1
    boundary = lambda inputs: (inputs.shape[0], inputs.shape[1] // seq_div, dim)
    return PipelineLoop(schedule, dict(stages), n_stages, pp_group, loss_fn, boundary,
                        SCHEDULES[cfg.pp_schedule].style)


def build_parallel_optimizer(par: Parallelized, dims: ParallelDims, mesh: DeviceMesh, t: TrainSection):
    """AdamW for the layout: ZeRO-1/2's partitioned optimizer, one per pipeline stage, or a plain one."""
    betas = (t.beta1, t.beta2)
    if dims.data_parallel == "zero1" and dims.dp_cp > 1:
        return build_zero1_optimizer(par.model.module, dp_cp_mesh(mesh), t.lr, t.weight_decay, betas, t.eps)
    if par.zero2 is not None:
        return build_zero2_optimizer(par.model, par.zero2, dp_mesh(mesh), t.lr, t.weight_decay, betas, t.eps)
    optimizers = [(part, _adamw(part, t)) for part in par.parts]
    return PartsOptimizer(optimizers) if dims.pp > 1 else optimizers[0][1]


def _adamw(part: nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    if not any(isinstance(p, DTensor) for p in part.parameters()):
        return build_optimizer(part, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    # foreach kernels refuse a mix of DTensors and plain tensors (tensor parallelism without sequence
    # parallelism leaves the norms plain), so each decay group is split by tensor type.
    groups = []
    for group in param_groups(part, t.weight_decay):
        for is_dtensor in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == is_dtensor]
            if params:
                groups.append({**group, "params": params})
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
