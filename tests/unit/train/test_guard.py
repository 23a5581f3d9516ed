"""The non-finite guard and the loss-spike rollback, through the one training driver with a real tiny model.

A batch is poisoned by a step function that multiplies its loss by NaN (or by a large factor for a spike):
the NaN reaches the gradients through backward, as an overflow in the forward would. The reference for a
skipped step is a run that never saw that batch: with a constant learning rate the two must end bitwise
equal, which holds only if the skipped step left the weights, the optimizer state (AdamW's step count
included) and the gradients as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cybertron.config import CheckpointSection, EvalSection, LogSection, TrainConfig, validate_shared_sections
from cybertron.data.loader import PackedLoader, iter_eval_batches
from cybertron.errors import ConfigError, TrainingDiverged
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train import checkpoint as ckpt_io
from cybertron.train import session
from cybertron.train.guard import GuardSettings, SpikeDetector, weights_finite
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import Batch, LanguageModelStep, StepResult, Trainer

SEQ_LEN, BATCH, LR = 16, 4, 1e-2


class PoisonableStep(LanguageModelStep):
    """Next-token prediction whose loss is multiplied by the batch's "factor" (NaN, or a spike's size)."""

    def __call__(self, model, batch):
        loss, extra = super().__call__(model, {k: v for k, v in batch.items() if k != "factor"})
        return (loss * batch["factor"] if "factor" in batch else loss), extra


class StreamTask:
    """Packed windows of one token stream; `poison` maps a loader batch index to a loss factor, and the
    batches in `drop` are drawn and thrown away (the reference run that never saw them)."""

    def __init__(self, trainer: Trainer, poison: dict[int, float], drop: set[int], dp_rank: int = 0,
                 dp_size: int = 1):
        tokens = np.random.default_rng(0).integers(0, 64, 4000).astype(np.int32)
        self.trainer, self.poison, self.drop = trainer, poison, drop
        self.loader = PackedLoader(tokens[:3600], SEQ_LEN, BATCH, dp_rank=dp_rank, dp_size=dp_size, seed=3)
        self.val = tokens[3600:]
        self.drawn = 0  # loader batches drawn so far

    def describe(self) -> str:
        return "token stream"

    def next_micro_batches(self, step: int) -> list[Batch]:
        while self.drawn in self.drop:
            self.loader.next_batch()
            self.drawn += 1
        inputs, labels = self.loader.next_batch()
        batch = {"inputs": inputs, "labels": labels}
        if self.drawn in self.poison:
            batch["factor"] = torch.tensor(self.poison[self.drawn])
        self.drawn += 1
        return [batch]

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(mb["inputs"].numel()) for mb in micro_batches)

    def log_fields(self, step: int, result: StepResult, seconds: float, tokens_per_s: float) -> dict[str, Any]:
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        batches = [{"inputs": i, "labels": t} for i, t in iter_eval_batches(self.val, SEQ_LEN, BATCH, 2)]
        return {"val_loss": self.trainer.evaluate(batches)}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.drawn = state["drawn"]


def _run(run_dir: Path, steps: int, poison: dict[int, float] | None = None, drop: set[int] = frozenset(),
         guard: GuardSettings | None = None, lr_at=lambda step: LR, checkpoint_every: int = 2,
         resume: bool = False) -> tuple[session.Finished, StreamTask]:
    model_cfg = preset_config("debug", vocab_size=64, n_layers=1, max_seq_len=SEQ_LEN)
    model = build_model(model_cfg, seed=0)
    optimizer = build_optimizer(model, LR, 0.1, (0.9, 0.95), 1e-8)
    trainer = Trainer(model, optimizer, PoisonableStep(), lr_at, 1.0)
    task = StreamTask(trainer, poison or {}, set(drop))
    driver = session.Driver(run_dir, session.find_resume_checkpoint(run_dir, resume), trainer, [model], model_cfg,
                            steps, EvalSection(every=0), CheckpointSection(every=checkpoint_every, keep=2),
                            LogSection(every=1, tensorboard=False, progress="lines"),
                            write_run_files=lambda d: None, guard=guard or GuardSettings())
    return session.run(driver, task, model), task


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_a_nan_step_is_skipped_as_if_its_batch_was_never_seen(tmp_path, capsys):
    poisoned, task = _run(tmp_path / "nan", steps=7, poison={3: math.nan})
    out = capsys.readouterr().out
    never_saw, _ = _run(tmp_path / "ref", steps=6, drop={3})  # six updates on the same six batches
    _assert_same_weights(poisoned.model, never_saw.model)
    assert weights_finite(poisoned.model)
    assert task.drawn == 7  # the data stream went past the poisoned batch
    skipped = [r for r in _records(tmp_path / "nan") if "skipped" in r]
    assert skipped == [{"step": 4, "skipped": "loss nan, grad norm nan", "skipped_in_a_row": 1}]
    assert "step 4/7 skipped: loss nan, grad norm nan; weights and optimizer state unchanged" in out
    assert out.splitlines()[-1].startswith("done: step 7, 1 skipped (not finite), checkpoint saved to")
    # the checkpoint due at step 4 waited for the next accepted step; none holds non-finite weights
    assert [p.name for p in ckpt_io.complete_checkpoints(tmp_path / "nan")] == ["step-6", "step-7"]


def test_too_many_nan_steps_in_a_row_stop_the_run_naming_the_step(tmp_path):
    with pytest.raises(TrainingDiverged) as err:
        _run(tmp_path / "run", steps=10, poison={i: math.nan for i in range(4, 10)},
             guard=GuardSettings(max_skipped_steps=3))
    message = str(err.value)
    assert "\n" not in message
    # steps 5, 6, 7 are skipped; the fourth non-finite step in a row, 8, stops the run
    assert message.startswith("training diverged at step 8: loss nan, grad norm nan, after 3 skipped steps in a "
                              "row (5-7), train.max_skipped_steps is 3")
    assert str(tmp_path / "run" / "checkpoints" / "step-4") in message
    assert [p.name for p in ckpt_io.complete_checkpoints(tmp_path / "run")] == ["step-2", "step-4"]
    assert [r["step"] for r in _records(tmp_path / "run") if "skipped" in r] == [5, 6, 7]


def test_max_skipped_steps_zero_stops_at_the_first_non_finite_step(tmp_path):
    with pytest.raises(TrainingDiverged, match="^training diverged at step 2: loss nan, grad norm nan, "
                                               "train.max_skipped_steps is 0"):
        _run(tmp_path / "run", steps=4, poison={1: math.nan}, guard=GuardSettings(max_skipped_steps=0))


def test_non_finite_weights_are_never_saved(tmp_path):
    # An infinite learning rate at step 4 turns finite gradients into non-finite weights: the checkpoint
    # due at step 4 is refused and the older ones stay.
    with pytest.raises(TrainingDiverged, match="^the weights are not finite at step 4: checkpoint not written"):
        _run(tmp_path / "run", steps=6, lr_at=lambda step: math.inf if step == 3 else LR)
    saved = ckpt_io.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["step-2"]
    model = build_model(preset_config("debug", vocab_size=64, n_layers=1, max_seq_len=SEQ_LEN), seed=1)
    ckpt_io.load_checkpoint(saved[-1], model, None)
    assert weights_finite(model)


def test_a_loss_spike_rolls_back_and_skips_the_batches_since_the_checkpoint(tmp_path, capsys):
    guard = GuardSettings(spike_zscore=10.0, spike_window=4)
    # loader batch 5 is step 6's: spiked, the run goes back to step 4 and trains on batches 6, 7, ...
    spiked, task = _run(tmp_path / "spike", steps=8, poison={5: 50.0}, guard=guard)
    out = capsys.readouterr().out
    never_saw, _ = _run(tmp_path / "ref", steps=8, drop={4, 5}, guard=guard)
    _assert_same_weights(spiked.model, never_saw.model)
    assert task.drawn == 10
    rollback = [r for r in _records(tmp_path / "spike") if "rolled_back_to" in r]
    assert len(rollback) == 1 and rollback[0]["step"] == 6 and rollback[0]["rolled_back_to"] == 4
    assert rollback[0]["skipped"].startswith("loss spike ")
    assert "rolled back to " in out and "skipping the batches of steps 5-6" in out


def test_spike_detector_is_one_sided_and_waits_for_a_full_window():
    detector = SpikeDetector(zscore=3.0, window=4)
    assert all(detector.check(loss) is None for loss in (100.0, 5.0, 4.0, 3.9))  # falling fast: no spike
    assert detector.check(1.0) is None  # far below the mean is progress
    assert detector.check(80.0) is not None
    assert list(detector.losses) == [5.0, 4.0, 3.9, 1.0]  # a spike does not join the window


def test_a_torn_last_metrics_line_resumes_and_is_dropped(tmp_path, capsys):
    whole, _ = _run(tmp_path / "whole", steps=6)
    _run(tmp_path / "cut", steps=4)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 4.1')  # a kill in the middle of a write
    resumed, _ = _run(tmp_path / "cut", steps=6, resume=True)
    assert "left out 1 unreadable line" in capsys.readouterr().out
    losses = lambda run_dir: [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # steps 1-6, each once, bitwise
    _assert_same_weights(resumed.model, whole.model)


def test_a_new_run_replaces_a_metrics_file_left_without_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "val_loss": 9.0}\n{"step": 1, "loss": 9.0}\n')
    _run(run_dir, steps=2)
    records = _records(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 2]  # evaluation at 0, steps 1 and 2, final evaluation
    assert all(r.get("loss", r.get("val_loss")) != 9.0 for r in records)


@pytest.mark.parametrize("key, value", [("max_skipped_steps", -1), ("spike_zscore", -1.0), ("spike_window", 1)])
def test_guard_keys_are_validated(key, value):
    cfg = TrainConfig()
    setattr(cfg.train, key, value)
    with pytest.raises(ConfigError, match=f"train.{key}"):
        validate_shared_sections(cfg)
