"""What every alignment task shares (session.Task): the announcement, the step record, the checkpoint state
and splitting rows into micro-batches. PreferenceTask (align/run.py) and GRPOTask (align/grpo_task.py) add
their data and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cybertron.align.config import AlignConfig
from cybertron.data.chat_template import ChatFormat
from cybertron.data.sft import RowLoader, RowMixtureLoader
from cybertron.data.tokenizer import TextTokenizer
from cybertron.finetune.lora import count_params
from cybertron.parallel.world import World
from cybertron.train.epochs import WorkPlan
from cybertron.train.metrics import memory_gib
from cybertron.train.trainer import Batch, StepResult, Trainer, to_device


@dataclass
class AlignTask:
    cfg: AlignConfig
    run_dir: Path
    device: torch.device
    tokenizer: TextTokenizer
    model: nn.Module  # the plain module (what generates and what checkpoints save); trainer.model may wrap it
    trainer: Trainer
    loader: RowLoader | RowMixtureLoader
    world: World
    plan: WorkPlan
    chat: ChatFormat
    description: str  # the method's data (and reward) line

    def describe_with(self, work: str) -> str:
        trainable, total = count_params(self.model)
        c = self.cfg
        where = self.world.describe()
        return (f"{c.align.method} with {c.finetune.method} weights on {where}: {trainable / 1e6:.2f}M of "
                f"{total / 1e6:.1f}M parameters train; {self.description}; {work}; {self.chat.describe()}; "
                f"run dir {self.run_dir}")

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        return {**{k: v.item() for k, v in result.metrics.items()}, **self.extra_log_fields(seconds),
                "mem_gib": memory_gib(self.device)}

    def extra_log_fields(self, seconds: float) -> dict[str, float]:
        """Method fields after the step function's metrics (GRPO's rollout statistics)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "method": self.cfg.finetune.method,
                "align_method": self.cfg.align.method}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


def split_rows(rows: Batch, micro: int, device: torch.device, batches: Callable[[Batch, int], list[Batch]]
               ) -> list[Batch]:
    n = next(iter(rows.values())).shape[0]
    return [to_device(b, device) for b in batches(rows, micro or n)]
