"""The one training driver (ARCHITECTURE.md rule 6): where the run directory is, what to resume from, the
run files, the announcement, evaluation at step 0, the loop with its eval / checkpoint cadence, and the final
evaluation, checkpoint and `done:` line.

Pretraining, fine-tuning, preference optimisation, reward modelling and GRPO build a Trainer and a small
typed Task (their batches, evaluation, log fields and checkpoint state) and hand both to `run`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from cybertron.config import CheckpointSection, EvalSection, LogSection, to_toml
from cybertron.errors import TrainingDiverged, UserError
from cybertron.files import write_text_atomic
from cybertron.models.config import ModelConfig
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.async_checkpoint import CheckpointSaver
from cybertron.train.guard import GuardSettings, SkipCounter, SpikeDetector, weights_finite
from cybertron.train.metrics import MetricsLogger, ProgressDisplay
from cybertron.train.trainer import Batch, LoopHooks, StepResult, Trainer, fit

# A loss spike that comes back after this many rollbacks to the same checkpoint, on batches never seen
# before, is not a few bad batches: the run stops instead of looping.
MAX_ROLLBACKS_TO_ONE_CHECKPOINT = 3

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
    write_text_atomic(run_dir / "config.toml", to_toml(cfg))


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
    guard: GuardSettings = field(default_factory=GuardSettings)  # skipped steps, spikes (train section)


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
        if d.trainer.loss_scale is not None and "loss_scale" in state:
            d.trainer.loss_scale.load_state_dict(state["loss_scale"])
        start_step = int(state["step"])
    if d.is_main:
        d.run_dir.mkdir(parents=True, exist_ok=True)
        d.write_run_files(d.run_dir)
    # Non-main ranks print nowhere: the progress lines come from rank 0 only.
    display = ProgressDisplay(d.steps, d.log.progress,
                              stream=None if d.is_main else open(os.devnull, "w"))  # noqa: SIM115
    # Resumed, the records after the checkpoint go (the file then reads as one uninterrupted run); new, an
    # old metrics.jsonl is from a run that died before its first checkpoint and is being redone: it goes.
    logger = MetricsLogger(d.run_dir, display, d.log, enabled=d.is_main,
                           resumed_at=start_step if d.resume_from is not None else None)
    if d.resume_from is not None:
        display.message(f"resumed from {d.resume_from} at step {start_step}")
        if logger.dropped_lines:
            display.message(f"metrics.jsonl: left out {logger.dropped_lines} unreadable line(s), a write cut "
                            "short when the run was stopped")
    else:
        display.message(task.describe())
    saver = CheckpointSaver(d.run_dir, d.model_cfg, d.checkpoint.keep, d.checkpoint.async_save, d.is_main,
                            d.barrier)
    finished = False
    try:
        path = _loop(d, task, logger, display, start_step, saver)
        finished = True
    finally:
        saver.close()
        logger.close(ok=finished)
    return Finished(d.run_dir, model, task, d.steps, path)


def _trainer_state(d: Driver, task: Task) -> dict[str, Any]:
    """What a checkpoint keeps besides the weights and optimizer: the task's data position and the fp16 loss
    scale (so a resumed run repeats the uninterrupted one)."""
    state = task.state_dict()
    if d.trainer.loss_scale is not None:
        state["loss_scale"] = d.trainer.loss_scale.state_dict()
    return state


def _loop(d: Driver, task: Task, logger: MetricsLogger, display: ProgressDisplay, start_step: int,
          saver: CheckpointSaver) -> Path:
    total = d.steps
    skips = SkipCounter(d.guard.max_skipped_steps)
    spikes = SpikeDetector(d.guard.spike_zscore, d.guard.spike_window) if d.guard.spike_zscore > 0 else None
    rollbacks: dict[int, int] = {}  # checkpoint step -> rollbacks to it
    save_due = False  # a checkpoint put off because its step was skipped
    skipped_at = -1  # the last step skipped without a rollback
    spiked: str | None = None  # the spike detector's verdict on the step just run

    def newest_good() -> str:
        saver.wait()  # a save still being written in the background may be the newest good one
        latest = ckpt_io.latest_checkpoint(d.run_dir)
        return str(latest) if latest is not None else "none (no checkpoint was written)"

    def evaluate(step: int) -> dict[str, float] | None:
        fields = task.evaluate(step)
        if fields is not None:
            logger.log({"step": step, **fields})
        return fields

    def save(step: int) -> Path:
        # Every rank checks, and all agree, before any writes: a checkpoint of non-finite weights would
        # become the newest and push a good one out of retention.
        if not weights_finite(d.saved):
            raise TrainingDiverged(f"the weights are not finite at step {step}: checkpoint not written; the "
                                   f"newest good checkpoint is {newest_good()}; lower train.lr")
        return saver.save(step, d.saved, d.trainer.optimizer, _trainer_state(d, task))

    def on_log(step: int, result: StepResult, seconds: float, tokens: int) -> None:
        tokens_per_s = tokens / max(seconds, 1e-9)
        logger.log({"step": step, "loss": result.loss.item(), "lr": d.trainer.lr_at(step - 1),
                    "grad_norm": result.grad_norm.item(), "tokens_per_s": tokens_per_s,
                    **task.log_fields(step, result, seconds, tokens_per_s), **result.moe})

    def veto(loss: float, grad_norm: float) -> str | None:
        nonlocal spiked
        spiked = spikes.check(loss) if spikes is not None else None
        return spiked

    def on_skip(step: int, result: StepResult) -> int:
        nonlocal skipped_at, spiked
        reason, was_spike, spiked = result.skipped, spiked is not None, None
        if result.overflow:  # fp16: the loss scale backs off; the weights are fine, so it is no divergence
            logger.log({"step": step, "skipped": reason})
            display.message(f"step {step}/{total} skipped: {reason}")
            return step
        if was_spike:
            saver.wait()  # a checkpoint still being written in the background is the one to roll back to
        latest = ckpt_io.latest_checkpoint(d.run_dir)
        if was_spike and latest is not None:
            return roll_back(step, reason, latest)
        skipped_at = step
        skips.skipped(step, reason, newest_good())
        logger.log({"step": step, "skipped": reason, "skipped_in_a_row": skips.in_a_row})
        display.message(f"step {step}/{total} skipped: {reason}; weights and optimizer state unchanged "
                        f"({skips.in_a_row} in a row, at most {skips.limit})")
        return step

    def roll_back(step: int, reason: str, latest: Path) -> int:
        # The spike is the symptom; the damage may be in the steps before it: go back to the checkpoint and
        # carry on with the batches after the spike (the task's data position is not restored).
        back_to = ckpt_io.read_trainer_state(latest)["step"]
        rollbacks[back_to] = rollbacks.get(back_to, 0) + 1
        if rollbacks[back_to] > MAX_ROLLBACKS_TO_ONE_CHECKPOINT:
            raise TrainingDiverged(f"{reason} at step {step} again after {MAX_ROLLBACKS_TO_ONE_CHECKPOINT} "
                                   f"rollbacks to {latest} on fresh batches: the loss spikes are not a few "
                                   "bad batches; lower train.lr or raise train.spike_zscore")
        ckpt_io.load_checkpoint(latest, d.saved, d.trainer.optimizer)
        skips.accepted()
        logger.log({"step": step, "skipped": reason, "rolled_back_to": back_to})
        display.message(f"step {step}/{total}: {reason}; rolled back to {latest} (step {back_to}), skipping "
                        f"the batches of steps {back_to + 1}-{step}")
        return back_to

    def on_step_end(step: int) -> None:
        nonlocal save_due
        saver.poll()
        if skipped_at != step:
            skips.accepted()
        if d.eval.every and step % d.eval.every == 0 and step != total:
            evaluate(step)
        if d.checkpoint.every and step % d.checkpoint.every == 0 and step != total:
            save_due = True
        if save_due and step != total:
            # Not while steps are being skipped: these weights make non-finite losses, and a checkpoint of
            # them would push a good one out of retention. The save waits for the next accepted step.
            if skips.in_a_row == 0:
                save(step)
                save_due = False
            else:
                display.message(f"checkpoint of step {step} put off: the step was skipped")

    hooks = LoopHooks(task.next_micro_batches, on_log, on_step_end, task.tokens_in, d.log.every,
                      on_skip=on_skip, veto=veto)
    if start_step == 0:
        evaluate(0)
    fit(d.trainer, start_step, total, hooks)
    final = evaluate(total)
    path = save(total)
    saver.finish()
    skipped = f"{skips.total} skipped (not finite), " if skips.total else ""
    display.message(f"done: step {total}, {skipped}{task.summary(final)}checkpoint saved to {path}")
    return path
