"""The run plumbing every training method shares: where the run directory is, what to resume from, the
config written next to the checkpoints, and announcing / running / closing the loop.

Pretraining, fine-tuning and alignment call these the same way; this module is what grows into the one
training driver (ARCHITECTURE.md rule 6)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cybertron.config import to_toml
from cybertron.errors import UserError
from cybertron.train import checkpoint as ckpt_io
from cybertron.train.metrics import MetricsLogger, ProgressDisplay

# Writes the run directory's metadata (runs.py's run.json) once the directory is known: a command hands it to
# the method, which calls it on the main rank when the run starts.
RecordRun = Callable[[Path], None]


def resolve_run_dir(cfg: Any) -> Path:
    """run.out, or a new timestamped directory under runs/."""
    if cfg.run.out:
        return Path(cfg.run.out)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def find_resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from. Refuses to start over a run that has checkpoints without --resume, and
    --resume without a checkpoint: starting from scratch there would hide a mistyped --out behind a whole run."""
    latest = ckpt_io.latest_checkpoint(run_dir)
    if latest is not None and not resume:
        raise UserError(f"{run_dir} already holds checkpoints (newest {latest.name}); pass --resume to continue "
                        "it or choose another --out")
    if latest is None and resume:
        where = "" if run_dir.is_dir() else " (the directory does not exist)"
        raise UserError(f"no checkpoint in {run_dir} to resume{where}; drop --resume to start a new run")
    if latest is not None:
        ckpt_io.read_trainer_state(latest)  # fail now, before anything is written, if it is unreadable
    return latest


def write_config(run_dir: Path, cfg: Any) -> None:
    """The resolved config as config.toml (what `--config run_dir/config.toml` repeats)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))


def announce_and_run(logger: MetricsLogger, display: ProgressDisplay, resume_from: Path | None, start_step: int,
                     describe: Callable[[], str], loop: Callable[[], None]) -> None:
    """Say what is starting (or resuming: the metrics file then drops records past the checkpoint), run the
    loop, and close the logger whatever happens. Shared by every training command."""
    if resume_from is not None:
        logger.truncate_after(start_step)
        display.message(f"resumed from {resume_from} at step {start_step}")
    else:
        display.message(describe())
    try:
        loop()
    finally:
        logger.close()
