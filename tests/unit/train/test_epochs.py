"""train.steps / train.epochs of fine-tuning and alignment: closed forms of the steps and the global batch,
and the config rules (steps win, both at once is refused, only these commands accept steps = 0)."""

import numpy as np
import pytest
import torch

from cybertron.align.config import AlignConfig
from cybertron.align.config import validate as validate_align
from cybertron.config import TrainConfig, parse_args, validate_shared_sections
from cybertron.data.sft import RowLoader
from cybertron.errors import ConfigError
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig
from cybertron.finetune.config import validate as validate_finetune
from cybertron.train.epochs import DEFAULT_EPOCHS, fit_batch, plan_work


@pytest.mark.parametrize("n_rows, batch, steps, epochs, unit, per, expected_steps, expected_batch", [
    (1, 8, 0, 0.0, 1, 1, 3, 1),  # 12 chats packed into one row: 3 steps of that row, not 100 of 8 copies
    (20, 8, 0, 0.0, 1, 1, 8, 8),  # ceil(3 x 20 / 8)
    (20, 8, 0, 2.5, 1, 1, 7, 8),  # ceil(2.5 x 20 / 8)
    (20, 8, 0, 0.1, 1, 1, 1, 8),  # at least one step
    (20, 8, 5, 0.0, 1, 1, 5, 8),  # steps given: they win
    (5, 8, 0, 1.0, 2, 1, 2, 4),  # two ranks: the batch stays a multiple of 2; ceil(5 / 4)
    (1, 8, 0, 1.0, 2, 1, 1, 2),  # more ranks than rows: one row repeats, once per rank
    (25, 8, 0, 1.0, 1, 3, 12, 8),  # grpo, 3 updates per rollout: ceil(25 / 8) = 4 rollouts
])
def test_steps_and_batch_closed_forms(n_rows, batch, steps, epochs, unit, per, expected_steps, expected_batch):
    plan = plan_work(n_rows, batch, steps, epochs, unit=unit, steps_per_batch=per)
    assert (plan.steps, plan.batch_size) == (expected_steps, expected_batch)
    assert plan.epochs == pytest.approx(plan.steps / per * plan.batch_size / n_rows)


def test_default_is_three_epochs_and_the_description_says_the_batch_was_cut():
    plan = plan_work(12, 16, 0, 0.0)
    assert plan.epochs == DEFAULT_EPOCHS and plan.steps == 3 and plan.batch_size == 12
    assert "3 steps = 3 epochs of 12 rows" in plan.describe()
    assert "train.global_batch_size=16 cut to the 12 training rows" in plan.describe()
    assert fit_batch(12, 8) == 8 and fit_batch(7, 8, unit=4) == 4


def test_auto_warmup_is_a_tenth_of_the_steps_at_most_ten():
    assert plan_work(12, 16, 0, 0.0).warmup_steps == 0  # 3 steps: a warmup would keep the lr far below its peak
    assert plan_work(400, 8, 0, 1.0).warmup_steps == 5
    assert plan_work(4000, 8, 0, 1.0).warmup_steps == 10
    assert plan_work(12, 16, 0, 0.0, warmup_steps=2).warmup_steps == 2  # given: kept


def test_a_batch_cut_to_the_data_holds_each_row_once_per_epoch():
    rows = {"inputs": torch.arange(6).unsqueeze(1)}
    loader = RowLoader(rows, fit_batch(6, 8), seed=0)
    for _ in range(3):
        batch = loader.next_batch()["inputs"].flatten().numpy()
        assert np.array_equal(np.sort(batch), np.arange(6))


def _finetune(*args):
    return parse_args(["--model", "m", "--data", "d.jsonl", *args], FinetuneConfig(), SHORTCUTS)


def test_steps_and_epochs_are_alternatives():
    assert (_finetune().train.steps, _finetune().train.epochs) == (0, 0.0)
    assert _finetune("--epochs", "2.5").train.epochs == 2.5
    validate_finetune(_finetune("--steps", "4"))
    validate_finetune(_finetune("--epochs", "1"))
    with pytest.raises(ConfigError, match=r"give train.steps \(4\) or train.epochs \(2.0\), not both"):
        validate_finetune(_finetune("--steps", "4", "--epochs", "2"))
    with pytest.raises(ConfigError, match=r"train.warmup_steps must be >= 0 \(or -1 = auto\)"):
        validate_finetune(_finetune("--train.warmup_steps", "-2"))
    with pytest.raises(ConfigError, match="train.epochs must be >= 0"):
        validate_finetune(_finetune("--epochs", "-1"))
    align = parse_args(["--model.path=m", "--data.path=d", "--train.steps=3", "--train.epochs=1"], AlignConfig())
    with pytest.raises(ConfigError, match="not both"):
        validate_align(align)
    pretrain = TrainConfig()
    pretrain.train.steps = 0  # pretraining has no epochs: its steps stay required
    with pytest.raises(ConfigError, match="train.steps must be >= 1, got 0"):
        validate_shared_sections(pretrain)
