"""How much work a fine-tuning or alignment run does over its (often small) data: the global batch, the
number of optimizer steps (from train.steps or train.epochs) and the warmup.

A batch larger than the data holds copies of rows: one packed row drawn 8 times gives that row's gradient
at 8 times the compute. So the global batch is cut to the number of training rows (kept a multiple of
what the ranks and micro-batches need), and an epoch is a pass over the rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 3.0  # train.steps = 0 and train.epochs = 0: the passes over small data a user expects
MAX_AUTO_WARMUP = 10  # train.warmup_steps = -1: a tenth of the steps, at most this many


@dataclass(frozen=True)
class WorkPlan:
    steps: int  # optimizer steps
    batch_size: int  # rows (pairs, prompts) per optimizer step over all ranks
    warmup_steps: int
    n_rows: int
    epochs: float  # passes over the rows the steps amount to
    requested_batch: int

    def describe(self, rows: str = "rows", per: str = "step") -> str:
        cut = (f" (train.global_batch_size={self.requested_batch} cut to the {self.n_rows} training {rows})"
               if self.batch_size < self.requested_batch else "")
        rows = rows[:-1] if self.n_rows == 1 else rows
        return (f"{self.steps} steps = {self.epochs:.3g} epochs of {self.n_rows} {rows}, {self.batch_size} per "
                f"{per}{cut}, {self.warmup_steps} warmup")


def fit_batch(n_rows: int, requested: int, unit: int = 1) -> int:
    """The global batch: `requested`, but no more than n_rows, rounded down to a multiple of `unit`
    (ranks x micro-batch) and at least one unit (more ranks than rows must repeat some)."""
    if requested <= n_rows:
        return requested
    return max(unit, n_rows // unit * unit)


def plan_work(n_rows: int, global_batch: int, steps: int, epochs: float, warmup_steps: int = -1, unit: int = 1,
              steps_per_batch: int = 1) -> WorkPlan:
    """steps > 0 wins; else ceil(epochs x n_rows / batch) batches (epochs 0 = DEFAULT_EPOCHS), each giving
    `steps_per_batch` optimizer steps (GRPO's updates per rollout). warmup_steps -1 = auto."""
    assert n_rows >= 1 and global_batch % unit == 0
    batch = fit_batch(n_rows, global_batch, unit)
    if steps == 0:
        batches = math.ceil(round((epochs or DEFAULT_EPOCHS) * n_rows / batch, 9))
        steps = max(1, batches) * steps_per_batch
    warmup = warmup_steps if warmup_steps >= 0 else min(MAX_AUTO_WARMUP, steps // 10)
    done = steps / steps_per_batch * batch / n_rows
    return WorkPlan(steps, batch, warmup, n_rows, done, global_batch)
