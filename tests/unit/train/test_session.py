"""The one training driver (train/session.py) with a real tiny model and a real task: next-token prediction
on a fixed token stream. The cadence (evaluation at 0, every N and at the end; checkpoints every M, K kept)
and resume equality hold for every method, since every method runs through this driver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cybertron.config import CheckpointSection, EvalSection, LogSection
from cybertron.data.loader import PackedLoader, iter_eval_batches
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train import checkpoint as ckpt_io
from cybertron.train import session
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import Batch, LanguageModelStep, StepResult, Trainer

SEQ_LEN, BATCH = 16, 4


class TokenStreamTask:
    """A real session.Task: packed windows of one token stream, evaluated on a held-out stream."""

    def __init__(self, trainer: Trainer, train: np.ndarray, val: np.ndarray):
        self.trainer = trainer
        self.loader = PackedLoader(train, SEQ_LEN, BATCH, seed=3)
        self.val = val
        self.steps_seen: list[int] = []

    def describe(self) -> str:
        return "token stream"

    def next_micro_batches(self, step: int) -> list[Batch]:
        self.steps_seen.append(step)
        inputs, labels = self.loader.next_batch()
        return [{"inputs": inputs[:2], "labels": labels[:2]}, {"inputs": inputs[2:], "labels": labels[2:]}]

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(mb["inputs"].numel()) for mb in micro_batches)

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        return {"units": int(result.units.item())}

    def evaluate(self, step: int) -> dict[str, float]:
        batches = [{"inputs": i, "labels": t} for i, t in iter_eval_batches(self.val, SEQ_LEN, BATCH, 2)]
        return {"val_loss": self.trainer.evaluate(batches)}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        return f"validation loss {evaluation['val_loss']:.4f}; " if evaluation else ""

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


def _run(run_dir: Path, steps: int, resume: bool = False, eval_every: int = 3,
         checkpoint: CheckpointSection | None = None, log_every: int = 2) -> tuple[session.Finished, TokenStreamTask]:
    model_cfg = preset_config("debug", vocab_size=64, n_layers=1, max_seq_len=SEQ_LEN)
    model = build_model(model_cfg, seed=0)
    optimizer = build_optimizer(model, 1e-2, 0.0, (0.9, 0.95), 1e-8)
    trainer = Trainer(model, optimizer, LanguageModelStep(), lambda step: 1e-2, 1.0)
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.int32)
    task = TokenStreamTask(trainer, tokens[:1600], tokens[1600:])
    resume_from = session.find_resume_checkpoint(run_dir, resume)
    driver = session.Driver(run_dir, resume_from, trainer, [model], model_cfg, steps, EvalSection(every=eval_every),
                            checkpoint or CheckpointSection(every=2, keep=2),
                            LogSection(every=log_every, tensorboard=False, progress="lines"),
                            write_run_files=lambda d: (d / "files.txt").write_text("written"))
    return session.run(driver, task, model), task


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cadence_of_evaluation_logging_and_checkpoints(tmp_path, capsys):
    finished, task = _run(tmp_path / "run", steps=7)
    records = _records(tmp_path / "run")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6, 7]  # at 0, every 3, and the end
    # logged: the first step, every 2, and the last; each with the task's fields after the common ones
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 6, 7]
    assert list(logged[0]) == ["step", "loss", "lr", "grad_norm", "tokens_per_s", "units"]
    assert all(r["units"] == BATCH * SEQ_LEN for r in logged)
    # saved at 2, 4, 6 and the end; two kept
    assert [p.name for p in ckpt_io.complete_checkpoints(tmp_path / "run")] == ["step-6", "step-7"]
    assert ckpt_io.read_trainer_state(finished.checkpoint) == {"step": 7, **task.state_dict()}
    assert task.steps_seen == list(range(7))
    assert (tmp_path / "run" / "files.txt").read_text() == "written"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "token stream"
    final = next(r["val_loss"] for r in records if r["step"] == 7 and "val_loss" in r)
    assert out[-1] == f"done: step 7, validation loss {final:.4f}; checkpoint saved to {finished.checkpoint}"


def test_resume_repeats_the_uninterrupted_run_bitwise(tmp_path, capsys):
    whole, _ = _run(tmp_path / "whole", steps=7)
    _run(tmp_path / "cut", steps=4)  # stops at step 4 with a checkpoint, as a killed run's last one
    resumed, task = _run(tmp_path / "cut", steps=7, resume=True)
    assert task.steps_seen == [4, 5, 6]
    assert "resumed from" in capsys.readouterr().out
    # Keyed by (step, kind): the cut run also logged step 5 (the first after resuming) and evaluated at 4.
    keyed = lambda run_dir: {(r["step"], "loss" in r): {k: v for k, v in r.items() if k != "tokens_per_s"}
                             for r in _records(run_dir)}
    cut, whole_records = keyed(tmp_path / "cut"), keyed(tmp_path / "whole")
    common = set(cut) & set(whole_records)
    assert {(6, True), (6, False), (7, True), (7, False)} <= common
    assert all(cut[key] == whole_records[key] for key in common)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
