"""The one training driver (ARCHITECTURE.md rule 6): where the run directory is, what to resume from, the
run files, the announcement, evaluation at step 0, the loop with its eval / checkpoint cadence, and the final
evaluation, checkpoint and `done:` line.

Pretraining, fine-tuning, preference optimisation, reward modelling and GRPO build a Trainer and a small
typed Task (their batches, evaluation, log fields and checkpoint state) and hand both to `run`."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from cybertron.config import CheckpointSection, EvalSection, LogSection, to_toml
from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.async_checkpoint import CheckpointSaver
from cybertron.train.metrics import MetricsLogger, ProgressDisplay
from cybertron.train.trainer import Batch, LoopHooks, StepResult, Trainer, fit

# Writes the run directory's metadata (runs.py's run.json) once the directory is known: a command hands it to
# the method, which calls it on the main rank when the run starts.
RecordRun = Callable[[Path], None]


def resolve_run_dir(cfg: Any) -> Path:
    """run.out, or a new timestamped directory under runs/."""
    if cfg.run.out:
        return Path(cfg.run.out)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def find_resume_checkpoint(run_dir: Path, resume: bool, report: bool = True) -> Path | None:
    """The checkpoint to resume from: the newest intact one (damaged newer ones are passed over with one line
    each when `report`). Refuses to start over a run that has checkpoints without --resume, and --resume
    without a checkpoint: starting from scratch there would hide a mistyped --out behind a whole run."""
    latest = ckpt_io.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints (newest {latest.name}); pass --resume to continue "
                        "it or choose another --out")
    if latest is None and resume:
        where = "" if run_dir.is_dir() else " (the directory does not exist)"
        raise UserError(f"no checkpoint in {run_dir} to resume{where}; drop --resume to start a new run")
    if latest is None:
        return None
    # Verified now, before anything is written: a damaged newest checkpoint falls back to an older one.
    return ckpt_io.intact_checkpoint(run_dir, ckpt_io.to_stderr if report else None)


def write_config(run_dir: Path, cfg: Any) -> None:
    """The resolved config as config.toml (what `--config run_dir/config.toml` repeats)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))


class Task(Protocol):
    """What a training method adds to the one driver: its data, its evaluation, its log fields, the state its
    checkpoints carry and the lines that describe it. Everything else (resume, run files, cadence, the
    summary) is the driver's, written once."""

    def describe(self) -> str:
        """The line announcing a new run (model, data, work plan, run directory)."""
        ...

    def next_micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches for the optimizer step with 0-based index `step`."""
        ...

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        """Tokens this rank processes in `micro_batches` (for tokens/s)."""
        ...

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        """Fields the method adds to a step's record, after the common ones."""
        ...

    def evaluate(self, step: int) -> dict[str, float] | None:
        """The evaluation record's fields (without the step), or None when there is nothing held out."""
        ...

    def summary(self, evaluation: dict[str, float] | None) -> str:
        """The final evaluation for the `done:` line ("validation loss 1.2345; "), or ""."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records besides weights and optimizer (loader position, method names)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint's trainer state (what state_dict returned, plus "step")."""
        ...


@dataclass
class Driver:
    """One training run of any method: what is built before the loop starts."""

    run_dir: Path
    resume_from: Path | None  # find_resume_checkpoint's answer
    trainer: Trainer
    saved: nn.Module | list[nn.Module]  # what checkpoints hold (adapters alone, this rank's pipeline stages)
    model_cfg: ModelConfig
    steps: int
    eval: EvalSection
    checkpoint: CheckpointSection
    log: LogSection
    write_run_files: Callable[[Path], None]  # config, tokenizer, metadata: called on the main rank
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None


@dataclass
class Finished:
    """What a run leaves for its caller (tests, benchmarks): where it wrote and what it trained."""

    run_dir: Path
    model: nn.Module  # the plain module (not a data-parallel wrapper)
    task: Task
    steps: int
    checkpoint: Path


def run(driver: Driver, task: Task, model: nn.Module) -> Finished:
    """Resume (weights, optimizer, the task's state), write the run files, announce, evaluate at step 0, train
    with the eval / checkpoint cadence, then evaluate, save and print the `done:` line."""
    d = driver
    start_step = 0
    if d.resume_from is not None:
        state = ckpt_io.load_checkpoint(d.resume_from, d.saved, d.trainer.optimizer, verified=True)
        task.load_state_dict(state)
        start_step = int(state["step"])
    if d.is_main:
        d.run_dir.mkdir(parents=True, exist_ok=True)
        d.write_run_files(d.run_dir)
    # Non-main ranks print nowhere: the progress lines come from rank 0 only.
    display = ProgressDisplay(d.steps, d.log.progress,
                              stream=None if d.is_main else open(os.devnull, "w"))  # noqa: SIM115
    logger = MetricsLogger(d.run_dir, display, d.log.tensorboard, enabled=d.is_main)
    if d.resume_from is not None:
        logger.truncate_after(start_step)  # the file then reads as one uninterrupted run
        display.message(f"resumed from {d.resume_from} at step {start_step}")
    else:
        display.message(task.describe())
    saver = CheckpointSaver(d.run_dir, d.model_cfg, d.checkpoint.keep, d.checkpoint.async_save, d.is_main,
                            d.barrier)
    try:
        path = _loop(d, task, logger, display, start_step, saver)
    finally:
        saver.close()
        logger.close()
    return Finished(d.run_dir, model, task, d.steps, path)


def _loop(d: Driver, task: Task, logger: MetricsLogger, display: ProgressDisplay, start_step: int,
          saver: CheckpointSaver) -> Path:
    total = d.steps

    def evaluate(step: int) -> dict[str, float] | None:
        fields = task.evaluate(step)
        if fields is not None:
            logger.log({"step": step, **fields})
        return fields

    def save(step: int) -> Path:
        return saver.save(step, d.saved, d.trainer.optimizer, task.state_dict())

    def on_log(step: int, result: StepResult, seconds: float, tokens: int) -> None:
        tokens_per_s = tokens / max(seconds, 1e-9)
        logger.log({"step": step, "loss": result.loss.item(), "lr": d.trainer.lr_at(step - 1),
                    "grad_norm": result.grad_norm.item(), "tokens_per_s": tokens_per_s,
                    **task.log_fields(step, result, seconds, tokens_per_s)})

    def on_step_end(step: int) -> None:
        saver.poll()
        if d.eval.every and step % d.eval.every == 0 and step != total:
            evaluate(step)
        if d.checkpoint.every and step % d.checkpoint.every == 0 and step != total:
            save(step)

    steps = itertools.count(start_step)  # 0-based index of the step about to run
    hooks = LoopHooks(lambda: task.next_micro_batches(next(steps)), on_log, on_step_end, task.tokens_in,
                      d.log.every)
    if start_step == 0:
        evaluate(0)
    fit(d.trainer, start_step, total, hooks)
    final = evaluate(total)
    path = save(total)
    saver.finish()
    display.message(f"done: step {total}, {task.summary(final)}checkpoint saved to {path}")
    return path
