"""Pipeline parallelism: split the model into stages by layer index, run them with a schedule from
torch.distributed.pipelining.

A stage is the same Transformer with the layers of other stages deleted from its ModuleDict (so names stay
`layers.<i>` and checkpoints stay layout-independent) and without the embedding (all but the first stage)
or the final norm and head (all but the last). The loss is the summed token cross-entropy scaled by the
trainer's 1 / global-token-count, with the schedule's own micro-batch averaging off (scale_grads=False),
which gives exactly the single-process token-mean loss.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from cybertron.errors import ConfigError
from cybertron.train.losses import cross_entropy_sum
from cybertron.train.trainer import Batch

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage


def pipelining() -> ModuleType:
    """torch.distributed.pipelining, imported at first use: it imports torch._dynamo, seconds of start-up that
    every command would pay while only pipeline-parallel runs need it."""
    import torch.distributed.pipelining as module

    return module


@dataclass(frozen=True)
class ScheduleSpec:
    class_name: str  # in torch.distributed.pipelining
    style: str  # "single": one stage per rank; "loop": stage r + k*pp; "v": stages r and 2*pp-1-r

    @property
    def cls(self) -> type:
        return getattr(pipelining(), self.class_name)


# name -> (torch class name, style); torch >= 2.11 (the floor in pyproject.toml) has every one of them
_SCHEDULE_CLASSES = {
    "gpipe": ("ScheduleGPipe", "single"),
    "1f1b": ("Schedule1F1B", "single"),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop"),
    "looped_bfs": ("ScheduleLoopedBFS", "loop"),
    "interleaved_zb": ("ScheduleInterleavedZeroBubble", "loop"),
    # ZBV and DualPipeV fail with gloo on torch 2.11 ("Pair is not connected"); fine on 2.13 and NCCL.
    "zbv": ("ScheduleZBVZeroBubble", "v"),
    "dualpipev": ("ScheduleDualPipeV", "v"),
}
SCHEDULES = {name: ScheduleSpec(cls, style) for name, (cls, style) in _SCHEDULE_CLASSES.items()}


ZERO_BUBBLE = ("interleaved_zb", "zbv", "dualpipev")


def validate_schedule(name: str, pp: int, virtual_stages: int, n_microbatches: int, tp: int = 1,
                      sharded_dp: bool = False) -> None:
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    style = SCHEDULES[name].style
    if style == "single" and virtual_stages != 1:
        raise ConfigError(f"parallel.pp_schedule={name} runs one stage per rank; set parallel.pp_virtual_stages"
                          f"=1 (got {virtual_stages}) or pick interleaved_1f1b / interleaved_zb")
    if style == "v" and virtual_stages != 2:
        raise ConfigError(f"parallel.pp_schedule={name} needs parallel.pp_virtual_stages=2 (a V of two stages "
                          f"per rank), got {virtual_stages}")
    if name in ZERO_BUBBLE and (tp > 1 or sharded_dp):
        raise ConfigError(f"parallel.pp_schedule={name} splits backward into input and weight passes, which "
                          "FSDP and tensor parallelism do not support here (wrong gradients / failures with "
                          "torch 2.13); use it with plain pipeline parallelism, or pick gpipe, 1f1b or "
                          "interleaved_1f1b")
    if style == "loop" and n_microbatches % pp:
        raise ConfigError(f"parallel.pp_schedule={name} needs parallel.pp_microbatches={n_microbatches} to be "
                          f"a multiple of parallel.pp={pp}")


def split_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """Contiguous layer indices per stage; earlier stages take the remainder (they also hold the embedding
    lookup, which is cheap, while the last stage holds the output head)."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def local_stage_ids(pp_rank: int, pp: int, virtual_stages: int, style: str) -> list[int]:
    if style == "v":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def build_stage_module(model: nn.Module, stage: int, n_stages: int, layer_ids: list[int]) -> nn.Module:
    """A copy of `model` that keeps only `layer_ids` (and the embedding / norm+head on the first / last)."""
    chunk = copy.deepcopy(model)
    for name in list(chunk.layers.keys()):
        if int(name) not in layer_ids:
            del chunk.layers[name]
    if stage != 0:
        chunk.embed_tokens = None
    if stage != n_stages - 1:
        chunk.norm = None
        chunk.lm_head = None
    return chunk


class PipelineLoss:
    """loss_fn for the schedule: summed cross-entropy x scale; keeps the unscaled sums for reporting."""

    def __init__(self, to_logits: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum):
        self.to_logits = to_logits
        self.loss_sum = loss_sum
        self.scale: torch.Tensor | float = 1.0
        self._unscaled: dict[int, torch.Tensor] = {}

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_sum(self.to_logits(output), target)
        scaled = loss * self.scale
        self._unscaled[id(scaled)] = loss.detach().float()
        return scaled

    def unscaled_total(self, losses: list[torch.Tensor]) -> torch.Tensor | None:
        """Sum of the unscaled losses behind the schedule's `losses` list (the schedule may call the loss
        function for other purposes too, e.g. shape inference on the first step)."""
        total = torch.stack([self._unscaled[id(t)] for t in losses]).sum() if losses else None
        self._unscaled.clear()
        return total


def build_schedule(name: str, stages: list[PipelineStage], n_microbatches: int, loss_fn: PipelineLoss):
    spec = SCHEDULES[name]
    target = stages[0] if spec.style == "single" else stages
    # The loss is already divided by the global token count: the schedule must not also average over
    # micro-batches (versions without the flag never did).
    no_rescale = {"scale_grads": False} if "scale_grads" in inspect.signature(spec.cls).parameters else {}
    return spec.cls(target, n_microbatches, loss_fn=loss_fn, **no_rescale)


def _stage_kwargs(batch: Batch) -> dict[str, torch.Tensor]:
    """What every stage needs besides the activations: the token positions of packed rows (RoPE angles and
    the document mask). The schedule splits keyword arguments into micro-batches and hands them to every
    stage, not only the first."""
    return {"positions": batch["positions"]} if "positions" in batch else {}


class PipelineLoop:
    """ForwardBackward strategy (see train/trainer.py) that runs each micro-batch through the schedule."""

    def __init__(self, schedule, chunks: dict[int, nn.Module], n_stages: int, pp_group: dist.ProcessGroup,
                 loss_fn: PipelineLoss, boundary_shape: Callable[[torch.Tensor], tuple[int, ...]], style: str):
        self.style = style
        self.schedule = schedule
        self.chunks = chunks  # stage index -> module, this rank's stages
        self.n_stages = n_stages
        self.pp_group = pp_group
        self.loss_fn = loss_fn
        self.boundary_shape = boundary_shape  # inputs (B, T) -> shape of the tensor passed between stages
        self.has_first = 0 in chunks
        self.has_last = n_stages - 1 in chunks
        self._step_kwargs = ({"return_outputs": False}
                             if "return_outputs" in inspect.signature(schedule.step).parameters else {})

    def _total_over_stages(self, local: torch.Tensor) -> torch.Tensor:
        # Only the last stage computes the loss; the sum over the pp group gives it to every rank.
        dist.all_reduce(local, group=self.pp_group)
        return local

    def forward_backward(self, trainer, micro_batches: list[Batch], scale: torch.Tensor):
        self.loss_fn.scale = scale
        local = torch.zeros((), dtype=torch.float32, device=scale.device)
        for mb in micro_batches:
            args = (mb["inputs"],) if self.has_first else ()
            target = mb["labels"] if self.has_last else None
            losses: list[torch.Tensor] = []
            with trainer.comm.step_context(), trainer.autocast():
                self.schedule.step(*args, target=target, losses=losses, **_stage_kwargs(mb), **self._step_kwargs)
            total = self.loss_fn.unscaled_total(losses)
            if total is not None:
                local = local + total
        return self._total_over_stages(local), {}

    def forward(self, trainer, batch: Batch) -> torch.Tensor:
        """Evaluation: stage by stage with plain send/recv (independent of the schedule's buffers, so
        evaluation batches may have any size)."""
        inputs, labels = batch["inputs"], batch["labels"]
        owner = {s: r for r, stages in enumerate(self._all_owners()) for s in stages}
        me = dist.get_rank(self.pp_group)
        loss = torch.zeros((), dtype=torch.float32, device=inputs.device)
        h = inputs
        for s in range(self.n_stages):
            if owner[s] != me:
                continue
            if s > 0 and owner[s - 1] != me:
                h = torch.empty(self.boundary_shape(inputs), dtype=torch.float32, device=inputs.device)
                dist.recv(h, src=dist.get_global_rank(self.pp_group, owner[s - 1]), group=self.pp_group)
            with trainer.comm.step_context(), trainer.autocast():
                out = self.chunks[s](h, **_stage_kwargs(batch))
                if s == self.n_stages - 1:
                    loss = self.loss_fn.loss_sum(self.loss_fn.to_logits(out), labels).float()
            h = out.float().contiguous()
            if s < self.n_stages - 1 and owner[s + 1] != me:
                dist.send(h, dst=dist.get_global_rank(self.pp_group, owner[s + 1]), group=self.pp_group)
        return self._total_over_stages(loss)

    def _all_owners(self) -> list[list[int]]:
        pp = dist.get_world_size(self.pp_group)
        return [local_stage_ids(r, pp, self.n_stages // pp, self.style) for r in range(pp)]
