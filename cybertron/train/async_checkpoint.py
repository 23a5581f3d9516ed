"""The training driver's checkpoint writer: DCP's async_save, so training goes on while a checkpoint is written.

`save` copies this rank's state into host memory (DCP's staging) and returns; a background thread writes the
files, then on the main rank publishes the checkpoint (trainer state, manifest, rename, retention: see
checkpoint.publish), so a checkpoint is complete only once its files are all on disk. At most one save is in
flight: the next save, and the end of the run, wait for it. The staged copy costs host memory the size of
this rank's model and optimizer state until the write ends. With async_save=False every save is
checkpoint.save_checkpoint, written before training continues.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from cybertron.models.config import ModelConfig
from cybertron.train import checkpoint as ckpt_io

_SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to save"


class CheckpointSaver:
    """Saves one run's checkpoints, asynchronously when `async_save`. Every rank calls `save` at the same
    steps (DCP is collective), and `finish` at the end."""

    def __init__(self, run_dir: Path, model_config: ModelConfig, keep: int, async_save: bool,
                 is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> None:
        self.run_dir, self.model_config, self.keep = Path(run_dir), model_config, keep
        self.async_save, self.is_main, self.barrier = async_save, is_main, barrier
        self._pending: Future[Path] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cybertron-checkpoint") if async_save else None
        self._group: Any = None
        if async_save and not (dist.is_available() and dist.is_initialized()):
            # DCP warns on every single-process save that it assumes one process, which is intended here. The
            # sync path silences it with catch_warnings around dcp.save, but the async write warns from its
            # thread, outside any such block (catch_warnings is not thread-safe), so the filter is installed
            # once, for that message alone.
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS, category=UserWarning)

    def save(self, step: int, model: Any, optimizer: Any, trainer_state: dict[str, Any]) -> Path:
        """Start saving `step` (written and published later when asynchronous); returns its final path."""
        if self._thread is None:
            return ckpt_io.save_checkpoint(self.run_dir, step, model, optimizer, trainer_state, self.model_config,
                                           self.keep, self.is_main, self.barrier)
        self.wait()
        tmp, final = ckpt_io.prepare_save(self.run_dir, step, self.is_main)
        self.barrier()
        state = ckpt_io.state_to_save(model, optimizer)
        with ckpt_io.quiet_dcp():
            written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._process_group())
        self._pending = self._thread.submit(self._publish_when_written, written, step, tmp, final,
                                            dict(trainer_state))
        return final

    def _process_group(self) -> Any:
        # DCP's writer thread runs collectives while training runs its own: on a separate gloo group (created
        # on every rank by the first save, which every rank makes) they never interleave, and gloo is the CPU
        # backend async_save requires even when training uses NCCL.
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _publish_when_written(self, written: Any, step: int, tmp: Path, final: Path,
                              trainer_state: dict[str, Any]) -> Path:
        try:
            written.result()
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            failed = ckpt_io.save_failed(err, tmp, self.is_main)
            if failed is err:
                raise
            raise failed from None
        if self.is_main:
            ckpt_io.publish(tmp, final, step, trainer_state, self.model_config, self.keep)
        return final

    def poll(self) -> None:
        """Between steps: surface a finished save's error now rather than at the next save."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> Path | None:
        """Block until the save in flight is written and published; its error (one CheckpointError for a full
        disk) is raised here."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def finish(self) -> None:
        """The end of the run: every rank's last save is published before any rank returns."""
        self.wait()
        self.barrier()

    def close(self) -> None:
        """Stop the thread, letting a save in flight end (and publish if it can). Raises nothing: after
        `finish` nothing is in flight, and otherwise the run is already stopping on another error, which
        a failed save must not hide."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(Exception, CheckpointException):
                pending.result()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
