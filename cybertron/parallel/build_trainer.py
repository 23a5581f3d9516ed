"""build_trainer: the one way every recipe (pretraining, fine-tuning, alignment) turns a plain, initialised
model into a Trainer for its layout, one process included: `parallelize()` applies the layout, then the
layout's optimizer and collectives, and the method's step function (next-token prediction unless the method
brings its own, e.g. a preference loss)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from cybertron.config import ParallelSection, TrainSection
from cybertron.parallel.apply import build_parallel_optimizer, parallelize
from cybertron.parallel.world import World
from cybertron.train.float8 import float8_compile_options
from cybertron.train.loss_scale import DynamicLossScale
from cybertron.train.precision import DTYPES, autocast
from cybertron.train.trainer import LanguageModelStep, StepFunction, Trainer


def build_trainer(model: nn.Module, world: World, p: ParallelSection, t: TrainSection, dtype_name: str,
                  lr_at: Callable[[int], float], step_fn: StepFunction | None = None,
                  converters: Sequence[Callable[[nn.Module], object]] = (),
                  replicas_equal: bool = False) -> tuple[Trainer, list[nn.Module]]:
    """The Trainer over `model` laid out as `world` says, and the modules whose state dicts make up this
    rank's share of the model (what checkpoints save).

    One process compiles forward + loss together (train.compile); a parallel layout compiles each block.
    replicas_equal: every rank loaded the same weights and seeded the same adapters (fine-tuning), so DDP
    skips its start-up broadcast."""
    # Under bf16, FSDP all-gathers parameters in bf16 (gradients are still reduced in fp32). Under fp16 it
    # gathers fp32, as one process holds them: parameters autocast does not cast (norm weights, the
    # embedding) would otherwise be rounded to fp16's 11-bit mantissa, and the run would drift from one
    # process's by about as much as fp16 differs from fp32.
    param_dtype = DTYPES[dtype_name] if dtype_name == "bf16" and world.is_distributed else None
    par = parallelize(model, world.dims, world.mesh, p, compile_blocks=t.compile and world.is_distributed,
                      param_dtype=param_dtype, converters=converters, replicas_equal=replicas_equal, fp8=t.fp8,
                      fused_loss=t.fused_loss)
    if step_fn is None:
        step_fn = par.step_fn if world.is_distributed else LanguageModelStep(
            compile=t.compile, fused_loss=t.fused_loss, compile_options=float8_compile_options(t.fp8))
    else:
        step_fn = par.wrap_step(step_fn)
    optimizer = build_parallel_optimizer(par, world.dims, world.mesh, t)
    trainer = Trainer(par.model, optimizer, step_fn, lr_at, t.grad_clip,
                      autocast=lambda: autocast(dtype_name, world.device), collectives=par.collectives,
                      strategy=par.strategy, loss_scale=DynamicLossScale() if dtype_name == "fp16" else None)
    return trainer, par.parts
