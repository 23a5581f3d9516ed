"""The training loop. It knows nothing of the task: a step function turns (model, batch) into a summed
loss, and the trainer handles accumulation, clipping, the optimizer, the schedule, logging, evaluation and
checkpoints. Pretraining, SFT, DPO, reward modelling and GRPO differ only by step function and data."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from cybertron.errors import ConfigError
from cybertron.train.fused_linear_ce import head_cross_entropy_sum
from cybertron.train.guard import non_finite_reason
from cybertron.train.loss_scale import DynamicLossScale
from cybertron.train.losses import IGNORE_INDEX, cross_entropy_sum
from cybertron.train.moe_balance import RouterBalance

Batch = dict[str, torch.Tensor]


class StepFunction(Protocol):
    def weight(self, batch: Batch) -> torch.Tensor:
        """How many loss units (tokens, pairs, ...) the batch holds: the loss is normalised by the global sum."""
        ...

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss over the batch's units, extra metric sums to log)."""
        ...


def _lm_loss_sum(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 positions: torch.Tensor | None) -> torch.Tensor:
    return cross_entropy_sum(model(inputs, positions=positions), labels)


def _fused_lm_loss_sum(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                       positions: torch.Tensor | None, vocab_parallel: bool = False) -> torch.Tensor:
    # The head runs inside the model's forward, so DDP and FSDP see it as part of their forward.
    head = partial(_head_loss, labels=labels, vocab_parallel=vocab_parallel)
    return model(inputs, positions=positions, head=head)


def _head_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, vocab_parallel: bool) -> torch.Tensor:
    # Only the weight is used: an adapted head (LoRA on lm_head) would lose its adapter (commands refuse it).
    assert type(lm_head) is nn.Linear, f"the fused loss needs a plain nn.Linear head, got {type(lm_head).__name__}"
    return head_cross_entropy_sum(hidden, lm_head, labels, vocab_parallel)


class LanguageModelStep:
    """Next-token prediction; labels of IGNORE_INDEX (prompt tokens, padding) carry no loss.

    With `compile=True` the forward *and* the loss are one torch.compile region, so inductor fuses the
    output head's log-softmax and cross-entropy too (faster than compiling each block alone on CPU; see
    bench/RESULTS.md). Modules are not wrapped, so parameter names, and with them checkpoints, are those of
    the plain model.

    With `fused_loss=True` the output head and the loss run chunk by chunk (train/fused_linear_ce.py): the
    full logits never exist. The model's forward runs them (its `head` argument), so DDP, FSDP and a head
    sharded by tensor parallelism work; `vocab_parallel` keeps such a head's vocabulary shards (loss
    parallelism) instead of gathering its weight.

    `compile_options` are inductor options for this compile only (e.g. what an fp8 recipe needs)."""

    def __init__(self, compile: bool = False, fused_loss: bool = False,
                 compile_options: dict[str, Any] | None = None, vocab_parallel: bool = False):
        loss_sum = partial(_fused_lm_loss_sum, vocab_parallel=vocab_parallel) if fused_loss else _lm_loss_sum
        self._loss_sum = torch.compile(loss_sum, options=compile_options) if compile else loss_sum

    def weight(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss_sum(model, batch["inputs"], batch["labels"], batch.get("positions")), {}


def _default_clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


@dataclass
class Collectives:
    """What the loop needs from the parallel layout. Single process: identities. parallel/ supplies real ones
    (sums over data-parallel ranks, the global gradient norm over all shards, DDP's no_sync)."""

    dp_size: int = 1
    # Ranks that each hold a share of every row's tokens (context parallelism): dp_size counts them, but
    # they see the same rows, so throughput counts each row once.
    row_share: int = 1
    sum_over_dp: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    clip_grad_norm: Callable[[list[torch.Tensor], float], torch.Tensor] = _default_clip
    no_sync: Callable[[nn.Module, bool], contextlib.AbstractContextManager] = (
        lambda model, last: contextlib.nullcontext())
    # Entered around each forward *and* its backward (e.g. tensor parallelism's loss_parallel).
    step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per unit over the global batch (a 0-dim tensor: no host sync yet)
    grad_norm: torch.Tensor
    units: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    moe: dict[str, float] = field(default_factory=dict)  # expert load per MoE layer, balancing loss
    skipped: str | None = None  # why the optimizer did not step (a non-finite loss or gradient norm, a veto)
    overflow: bool = False  # skipped for an fp16 overflow that the loss scale backs off from (not divergence)


# Judges a step's finite (loss, gradient norm) before the update: a reason to skip it, or None.
Veto = Callable[[float, float], "str | None"]


class ForwardBackward(Protocol):
    """How one rank turns its micro-batches into gradients. The default runs them one after another
    (gradient accumulation); pipeline parallelism plugs in a schedule instead (parallel/pipeline.py)."""

    def forward_backward(self, trainer: Trainer, micro_batches: list[Batch],
                         scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backpropagate sum-loss x scale; return (this rank's summed loss, extra metric sums)."""
        ...

    def forward(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        """Summed loss of one batch without gradients (evaluation)."""
        ...


class MicroBatchLoop:
    """Forward and backward each micro-batch in turn; gradients accumulate in .grad."""

    def forward_backward(self, trainer: Trainer, micro_batches: list[Batch],
                         scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum = torch.zeros((), dtype=torch.float32, device=scale.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro_batches):
            with trainer.comm.no_sync(trainer.model, i == len(micro_batches) - 1), trainer.comm.step_context():
                with trainer.autocast():
                    loss, extra = trainer.step_fn(trainer.model, mb)
                # Mixture of experts: the load-balancing loss joins the backward, not the logged loss.
                balance = trainer.balance
                aux = balance.micro_batch_loss(trainer.step_fn.weight(mb)) if balance is not None else None
                ((loss if aux is None else loss + aux) * scale).backward()
                if balance is not None:
                    balance.discard()
            loss_sum += loss.detach().float()
            for key, value in extra.items():
                metric_sums[key] = metric_sums.get(key, 0) + value.detach().float()
        return loss_sum, metric_sums

    def forward(self, trainer: Trainer, batch: Batch) -> torch.Tensor:
        with trainer.comm.step_context(), trainer.autocast():
            return trainer.step_fn(trainer.model, batch)[0].float()


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFunction,
                 lr_at: Callable[[int], float], grad_clip: float,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 collectives: Collectives | None = None, strategy: ForwardBackward | None = None,
                 loss_scale: DynamicLossScale | None = None):
        self.model = model
        self.optimizer = optimizer
        self.step_fn = step_fn
        self.lr_at = lr_at
        self.grad_clip = grad_clip
        self.autocast = autocast
        self.comm = collectives or Collectives()
        self.strategy = strategy or MicroBatchLoop()
        self.loss_scale = loss_scale  # fp16: dynamic loss scaling (train/loss_scale.py)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.balance = RouterBalance.of(model)  # None without mixture-of-experts layers
        if self.balance is not None and self.balance.aux_loss_coef > 0 and not isinstance(self.strategy,
                                                                                         MicroBatchLoop):
            # A pipeline schedule computes the loss on the last stage only; the routers live on every stage.
            raise ConfigError("model.aux_loss_coef > 0 does not run with pipeline parallelism (parallel.pp > 1) "
                              "yet; set it to 0 (model.bias_update_rate balances without a loss)")

    def train_step(self, step: int, micro_batches: list[Batch], veto: Veto | None = None) -> StepResult:
        """One optimizer step over `micro_batches` (this rank's share of the global batch).

        A step whose global loss or gradient norm is not finite, or that `veto` rejects, leaves the weights
        and the optimizer state as they were (the gradients are dropped); StepResult.skipped says why. Both
        values are global, so every rank decides the same (train/guard.py). Judging them costs one host
        sync per step, as GradScaler's inf check does."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        local_units = torch.stack([self.step_fn.weight(mb) for mb in micro_batches]).sum().float()
        global_units = self.comm.sum_over_dp(local_units).clamp(min=1)
        # Every rank divides by the global count; DP averaging over dp_size ranks is undone by the factor.
        scale = self.comm.dp_size / global_units
        ls = self.loss_scale
        loss_sum, metric_sums = self.strategy.forward_backward(self, micro_batches,
                                                               scale * ls.scale if ls is not None else scale)
        if ls is not None:
            ls.unscale_(self.params)  # before the norm and clipping, which must see the true gradients
        grad_norm = self.comm.clip_grad_norm(self.params, self.grad_clip)
        loss = self.comm.sum_over_dp(loss_sum) / global_units
        loss_value, norm_value = float(loss), float(grad_norm)
        skipped = non_finite_reason(loss_value, norm_value)
        overflow = (ls is not None and skipped is not None and math.isfinite(loss_value)
                    and ls.explains(norm_value))
        if overflow:
            skipped = f"fp16 gradient overflow (grad norm {norm_value}), loss scale {ls.scale:g} -> " \
                      f"{ls.scale * ls.backoff_factor:g}"
        if skipped is None and veto is not None:
            skipped = veto(loss_value, norm_value)
        if skipped is None:
            self.optimizer.step()
        if ls is not None and (overflow or skipped is None):
            ls.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: self.comm.sum_over_dp(v) / global_units for k, v in metric_sums.items()}
        moe = self.balance.end_step(self.comm.sum_over_dp, skipped is None) if self.balance is not None else {}
        return StepResult(loss, grad_norm, global_units, metrics, moe, skipped, overflow)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> float:
        """Mean loss per unit over `batches` (this rank's share), summed over data-parallel ranks."""
        was_training = self.model.training
        self.model.eval()
        loss_sum, units = None, None
        for batch in batches:
            loss = self.strategy.forward(self, batch)
            weight = self.step_fn.weight(batch).float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            units = weight if units is None else units + weight
        self.model.train(was_training)
        return (self.comm.sum_over_dp(loss_sum) / self.comm.sum_over_dp(units).clamp(min=1)).item()


@dataclass
class LoopHooks:
    """What happens around the steps of `fit`: where batches come from and what runs every so often."""

    next_micro_batches: Callable[[int], list[Batch]]  # the 0-based index of the step about to run
    on_log: Callable[[int, StepResult, float, int], None]  # (step, result, seconds since last log, tokens)
    on_step_end: Callable[[int], None] = lambda step: None  # evaluation, checkpoints
    tokens_in: Callable[[list[Batch]], int] = lambda mbs: sum(int(mb["inputs"].numel()) for mb in mbs)
    log_every: int = 10
    # A skipped step: returns the step the run goes on after, the skipped one or, after a rollback, an
    # earlier one (the batches still come from where the data stream is).
    on_skip: Callable[[int, StepResult], int] = lambda step, result: step
    veto: Veto | None = None


def fit(trainer: Trainer, start_step: int, total_steps: int, hooks: LoopHooks) -> None:
    """Run steps start_step+1 .. total_steps (1-based step numbers, as logged and checkpointed)."""
    trainer.model.train()
    last_time = time.perf_counter()
    tokens_since_log = 0
    step = start_step
    while step < total_steps:
        step += 1
        micro_batches = hooks.next_micro_batches(step - 1)
        result = trainer.train_step(step - 1, micro_batches, hooks.veto)
        tokens_since_log += hooks.tokens_in(micro_batches) * trainer.comm.dp_size // trainer.comm.row_share
        started = time.perf_counter()
        if result.skipped is not None:
            went_on_from = hooks.on_skip(step, result)
            if went_on_from != step:  # rolled back: that step's evaluation and checkpoint are done
                step = went_on_from
                last_time += time.perf_counter() - started
                continue
        elif step % hooks.log_every == 0 or step == total_steps or step == start_step + 1:
            now = time.perf_counter()  # the .item() inside on_log syncs the device: timing is honest
            hooks.on_log(step, result, now - last_time, tokens_since_log)
            last_time, tokens_since_log = time.perf_counter(), 0
            started = last_time
        hooks.on_step_end(step)
        # Evaluation and checkpoints are not training: keep their time out of the next tokens/s.
        last_time += time.perf_counter() - started


def to_device(batch: dict[str, Any], device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
