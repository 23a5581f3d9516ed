"""Asynchronous checkpoints (checkpoint.async_save): a checkpoint written while training went on holds the state of
its own step, so resuming from it repeats the uninterrupted run bitwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from cybertron.config import CheckpointSection
from cybertron.train import checkpoint as ckpt_io
from cybertron.train import session
from tests.unit.train.test_session import _run as run_token_stream


def _run(run_dir: Path, steps: int, async_save: bool, resume: bool = False) -> session.Finished:
    return run_token_stream(run_dir, steps, resume, eval_every=0, log_every=1,
                            checkpoint=CheckpointSection(every=2, keep=10, async_save=async_save))[0]


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_from_a_checkpoint_written_while_training_went_on_is_bitwise(tmp_path):
    whole = _run(tmp_path / "async", steps=6, async_save=True)
    assert [p.name for p in ckpt_io.complete_checkpoints(tmp_path / "async")] == ["step-2", "step-4", "step-6"]
    assert all(ckpt_io.checkpoint_problem(p) is None for p in ckpt_io.complete_checkpoints(tmp_path / "async"))
    # step-2 was written in the background during steps 3 and 4: resume from it alone
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "async", cut)
    for name in ("step-4", "step-6"):
        shutil.rmtree(cut / "checkpoints" / name)
    resumed = _run(cut, steps=6, async_save=False, resume=True)
    assert _losses(cut) == _losses(tmp_path / "async")  # float equality of every step's loss
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # and the synchronous writer produces the same losses (the reference the other resume tests use)
    _run(tmp_path / "sync", steps=6, async_save=False)
    assert _losses(tmp_path / "sync") == _losses(tmp_path / "async")
