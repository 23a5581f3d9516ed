"""Tensor-parallel styles for torchao Float8Linear layers (train.fp8=tensorwise): the same shardings as
torch's column- and row-parallel styles, with the activations cast to float8 *before* they are
redistributed, so tensor parallelism's all-gathers move float8 bytes and each activation is cast once
(torchao.float8.float8_tensor_parallel, as torchtitan applies it). torchao imports stay inside this file:
it is an optional dependency."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel


def float8_style(module: nn.Module, style: ParallelStyle) -> ParallelStyle:
    """The float8 form of `style` for `module`, or `style` itself where there is none: a Linear left in high
    precision (the output head, a layer the float8 GEMM cannot take), or a module whose input also feeds
    plain Linears."""
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    kind = type(style)
    if isinstance(module, Float8Linear) and kind in (ColwiseParallel, RowwiseParallel):
        float8_kind = Float8ColwiseParallel if kind is ColwiseParallel else Float8RowwiseParallel
        return float8_kind(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                           use_local_output=style.use_local_output)
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if kind is PrepareModuleInput and linears and all(isinstance(m, Float8Linear) for m in linears):
        return PrepareFloat8ModuleInput(input_layouts=style.input_layouts,
                                        desired_input_layouts=style.desired_input_layouts,
                                        use_local_output=style.use_local_output)
    return style
