"""What keeps a diverging run from doing harm: a step whose loss or gradient norm is not finite is skipped
(train/trainer.py), the skips in a row are counted up to a limit, an optional detector flags loss spikes
(the driver then rolls back to the newest checkpoint), and weights that are not finite are never saved.

Every rank must take the same decision, or the ranks fall out of step in their collectives. The loss the
Trainer judges is already summed over data-parallel ranks and pipeline stages (and equal on tensor-parallel
ranks), the gradient norm is the global one, and an all-reduce hands every rank the same bits, so the same
arithmetic on them decides the same everywhere; the weights' check is all-reduced here."""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from cybertron.errors import TrainingDiverged


def non_finite_reason(loss: float, grad_norm: float) -> str | None:
    """Why a step with this loss and gradient norm must not update the weights, or None."""
    bad = [f"{name} {value}" for name, value in (("loss", loss), ("grad norm", grad_norm))
           if not math.isfinite(value)]
    return ", ".join(bad) or None


@dataclass
class GuardSettings:
    """The train section's keys for the guard (config.py documents them)."""

    max_skipped_steps: int = 5
    spike_zscore: float = 0.0
    spike_window: int = 50

    @classmethod
    def of(cls, train_section) -> GuardSettings:
        return cls(train_section.max_skipped_steps, train_section.spike_zscore, train_section.spike_window)


class SkipCounter:
    """Counts skipped steps in a row; one more past the limit means the run has diverged: the weights do not
    change while steps are skipped, so more batches would only repeat the verdict."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.first = 0
        self.total = 0

    def skipped(self, step: int, reason: str, newest_checkpoint: str) -> None:
        """Count `step` as skipped, or raise TrainingDiverged if `limit` steps in a row already were."""
        if self.in_a_row >= self.limit:
            before = (f", after {self.in_a_row} skipped steps in a row ({self.first}-{step - 1})"
                      if self.in_a_row else "")
            raise TrainingDiverged(
                f"training diverged at step {step}: {reason}{before}, train.max_skipped_steps is {self.limit}; "
                f"the newest good checkpoint is {newest_checkpoint}; lower train.lr or raise train.warmup_steps")
        if self.in_a_row == 0:
            self.first = step
        self.in_a_row += 1
        self.total += 1

    def accepted(self) -> None:
        self.in_a_row = 0


class SpikeDetector:
    """Flags a loss more than `zscore` standard deviations above the mean of the last `window` accepted
    losses. One-sided: a falling loss is progress. Judges only once the window is full."""

    def __init__(self, zscore: float, window: int):
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str | None:
        """A reason to skip and roll back, or None (then the loss joins the window)."""
        if len(self.losses) == self.losses.maxlen:
            mean = statistics.fmean(self.losses)
            # A floor on the spread: on a flat loss curve, rounding noise must not count as a spike.
            std = max(statistics.pstdev(self.losses), 1e-3 * abs(mean), 1e-12)
            z = (loss - mean) / std
            if z > self.zscore:
                return f"loss spike {loss:.4f} (z-score {z:.1f} over the last {len(self.losses)} steps)"
        self.losses.append(loss)
        return None


def _trained_tensors(modules: Iterable[nn.Module]) -> Iterable[torch.Tensor]:
    # Only trained parameters can stop being finite; frozen ones (a QLoRA base in NF4) are left alone.
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                yield p.to_local() if isinstance(p, DTensor) else p


@torch.no_grad()
def weights_finite(modules: nn.Module | list[nn.Module]) -> bool:
    """Whether every trained weight of every rank is finite: one pass over this rank's shards and one
    all-reduce (every rank must call it, as every rank saves)."""
    modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
    bad = torch.zeros((), dtype=torch.float32)
    for t in _trained_tensors(modules):
        bad = bad.to(t.device) + (~torch.isfinite(t)).any().float()
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (CPU-offloaded weights included)
            bad = bad.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
