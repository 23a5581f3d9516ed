"""The loop's arithmetic: accumulation, token weighting, clipping, schedule, decay groups."""

import copy
import math

import pytest
import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.losses import IGNORE_INDEX, cross_entropy_sum
from cybertron.train.optim import build_optimizer
from cybertron.train.schedule import lr_at
from cybertron.train.trainer import LanguageModelStep, Trainer


def _setup(seed=0, lr=1e-3):
    model = build_model(preset_config("debug"), seed=seed)
    opt = build_optimizer(model, lr=lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    return model, Trainer(model, opt, LanguageModelStep(), lambda step: lr, grad_clip=1.0)


def _batch(n, t=16, seed=0, mask_prompt=False):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 256, (n, t), generator=g)
    labels = torch.randint(0, 256, (n, t), generator=g)
    if mask_prompt:  # uneven numbers of loss tokens per row, like SFT prompts
        for row in range(n):
            labels[row, : (row * 5) % t] = IGNORE_INDEX
    return {"inputs": inputs, "labels": labels}


def _split(batch, k):
    size = batch["inputs"].shape[0] // k
    return [{key: v[i * size:(i + 1) * size] for key, v in batch.items()} for i in range(k)]


def _grads_after_backward(trainer, micro_batches):
    """The accumulated gradient the optimizer would see (captured by a no-op optimizer step)."""
    captured = {}
    trainer.optimizer.step = lambda: captured.update(
        {id(p): p.grad.clone() for p in trainer.params})  # type: ignore[method-assign]
    trainer.train_step(0, micro_batches)
    return [captured[id(p)] for p in trainer.params]


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_accumulated_gradient_equals_large_batch_gradient(mask_prompt):
    _, trainer_a = _setup()
    _, trainer_b = _setup()
    batch = _batch(8, mask_prompt=mask_prompt)
    for ga, gb in zip(_grads_after_backward(trainer_a, [batch]), _grads_after_backward(trainer_b, _split(batch, 4))):
        assert (ga - gb).abs().max().item() <= 1e-6


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_accumulation_reports_the_large_batch_loss_and_norm(mask_prompt):
    # The update is lr x AdamW(gradient): with the gradient equal (above), so are loss and clipping norm.
    # (Adam's first step divides by |g| + eps, so parameters are compared through the gradient, not after
    # a step, where fp32 summation order is amplified on entries with |g| near eps.)
    _, trainer_a = _setup()
    _, trainer_b = _setup()
    batch = _batch(8, mask_prompt=mask_prompt)
    res_a = trainer_a.train_step(0, [batch])
    res_b = trainer_b.train_step(0, _split(batch, 4))
    assert abs(res_a.loss.item() - res_b.loss.item()) <= 1e-6
    assert abs(res_a.grad_norm.item() - res_b.grad_norm.item()) <= 1e-6


def test_reported_loss_is_mean_over_tokens():
    model, trainer = _setup()
    batch = _batch(4, mask_prompt=True)
    with torch.no_grad():
        expected = (cross_entropy_sum(model(batch["inputs"]), batch["labels"])
                    / (batch["labels"] != IGNORE_INDEX).sum()).item()
        reference = torch.nn.functional.cross_entropy(model(batch["inputs"]).flatten(0, 1),
                                                      batch["labels"].flatten()).item()
    result = trainer.train_step(0, [batch])
    assert abs(result.loss.item() - expected) < 1e-6
    assert abs(result.loss.item() - reference) < 1e-5


def test_gradient_clipping_bounds_the_update_norm():
    model, trainer = _setup()
    trainer.grad_clip = 1e-3
    before = copy.deepcopy(model.state_dict())
    batch = _batch(4)
    trainer.optimizer.param_groups[0]["lr"] = 0.0  # measure the clipped gradient, not the step
    loss, _ = trainer.step_fn(model, batch)
    (loss / trainer.step_fn.weight(batch)).backward()
    norm = trainer.comm.clip_grad_norm(trainer.params, 1e-3)
    clipped = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in trainer.params)).item()
    assert norm.item() > 1e-3 and abs(clipped - 1e-3) < 1e-6
    assert before.keys() == model.state_dict().keys()


def test_schedule_warms_up_then_decays_to_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    mid = lr_at(55, 1.0, 10, 100, 0.1)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(preset_config("debug"), seed=0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[i].endswith("proj.weight") or names[i] == "lm_head.weight" for i in decayed)
    assert id(model.embed_tokens.weight) not in decayed
    assert id(model.norm.weight) not in decayed
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(model.parameters()))


def test_bf16_autocast_on_cpu_tracks_fp32():
    from cybertron.train.precision import autocast

    model_a, trainer_a = _setup()
    model_b, trainer_b = _setup()
    trainer_b.autocast = lambda: autocast("bf16", torch.device("cpu"))
    batch = _batch(4)
    for step in range(3):
        res_a = trainer_a.train_step(step, [batch])
        res_b = trainer_b.train_step(step, [batch])
        assert abs(res_a.loss.item() - res_b.loss.item()) < 0.05  # bf16 rounding, not a different model
    assert all(p.dtype == torch.float32 for p in model_b.parameters())  # fp32 master weights


def test_compiled_step_matches_eager_and_keeps_parameter_names():
    model_a, trainer_a = _setup()
    model_b, trainer_b = _setup()
    trainer_b.step_fn = LanguageModelStep(compile=True)
    batch = _batch(4)
    for step in range(2):
        res_a = trainer_a.train_step(step, [batch])
        res_b = trainer_b.train_step(step, [batch])
        assert abs(res_a.loss.item() - res_b.loss.item()) < 1e-5
    assert list(model_b.state_dict()) == list(model_a.state_dict())  # checkpoints keep the plain names


def test_time_spent_in_step_end_hooks_is_not_counted_as_training_time():
    import time

    from cybertron.train.trainer import LoopHooks, fit

    class SquareStep:
        def weight(self, batch):
            return torch.tensor(batch["x"].shape[0])

        def __call__(self, model, batch):
            return (model(batch["x"]) ** 2).sum(), {}

    model = torch.nn.Linear(4, 1)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), SquareStep(), lambda s: 0.1, 0.0)
    intervals = {}
    hooks = LoopHooks(next_micro_batches=lambda step: [{"x": torch.randn(2, 4), "inputs": torch.zeros(2, 3)}],
                      on_log=lambda step, result, seconds, tokens: intervals.__setitem__(step, seconds),
                      on_step_end=lambda step: time.sleep(0.3) if step == 2 else None, log_every=1)
    fit(trainer, 0, 4, hooks)
    assert sorted(intervals) == [1, 2, 3, 4]
    assert intervals[3] < 0.1  # the 0.3 s "evaluation" after step 2 is not in step 3's interval
