"""Dynamic loss scaling for fp16 training (train.dtype=fp16, for GPUs without bf16).

fp16 gradients underflow to zero below ~6e-8, so the loss is multiplied by a large factor S before backward
and the gradients divided by S before clipping and the update. When a step overflows (a non-finite gradient
norm), the step is skipped and S halves; after `growth_interval` good steps in a row S doubles: the policy
and defaults of torch.amp.GradScaler.

Written here rather than with GradScaler because GradScaler needs a torch optimizer it can unscale and step
per device, and finds infs per device: our layouts use ZeRO-1/2 partitioned optimizers and per-stage pipeline
optimizers, and the Trainer already computes the true global gradient norm over every shard and stage
(parallel/collectives.py), which is the global overflow check that ShardedGradScaler adds for FSDP. One scale
and that norm serve every layout."""

from __future__ import annotations

from typing import Any

import torch


class DynamicLossScale:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients (local shards, DTensors included) by the scale, in place."""
        inv = 1.0 / self.scale
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv)

    def explains(self, grad_norm: float) -> bool:
        """Whether a non-finite gradient norm is an fp16 overflow the scale can fix: while the scale is above 1
        it may be what overflowed; at 1 or below the gradients themselves are not finite (divergence)."""
        return self.scale > 1.0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
