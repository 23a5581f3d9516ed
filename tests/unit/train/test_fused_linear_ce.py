"""The chunked head + cross-entropy against the plain path (logits, then F.cross_entropy): the same summed loss
and the same gradients for the hidden states and the head, with ignored labels, tied embeddings, a frozen
head, bf16 autocast and torch.compile; and the Trainer's language-model step with fused_loss=True."""

import pytest
import torch
import torch.nn.functional as F

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.fused_linear_ce import linear_cross_entropy_sum
from cybertron.train.losses import IGNORE_INDEX
from cybertron.train.trainer import LanguageModelStep, Trainer


def _inputs(n=37, d=24, v=101, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_loss_and_gradients_equal_the_plain_path(chunk):
    hidden, weight, labels = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = F.cross_entropy(h1 @ w1.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (expected * 0.7).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = linear_cross_entropy_sum(h2, w2, labels, chunk_tokens=chunk)
    (got * 0.7).backward()  # a scaled loss, as the trainer's 1 / global units
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-6, atol=1e-7)
    assert (h2.grad[::5] == 0).all()  # ignored positions give no gradient


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden, weight, labels = _inputs()
    labels[:] = IGNORE_INDEX
    h = hidden.requires_grad_()
    loss = linear_cross_entropy_sum(h, weight, labels)
    loss.backward()
    assert loss.item() == 0.0 and (h.grad == 0).all()


def test_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    hidden, weight, labels = _inputs()
    h = hidden.clone().requires_grad_()
    linear_cross_entropy_sum(h, weight, labels, chunk_tokens=10).backward()
    h_ref = hidden.clone().requires_grad_()
    F.cross_entropy(h_ref @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum").backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("tied, compiled", [(False, False), (True, False),
                                            pytest.param(True, True, marks=pytest.mark.slow)])  # compile: 11 s
def test_language_model_step_with_fused_loss_matches_the_plain_step(tied, compiled):
    cfg = preset_config("debug", tie_embeddings=tied)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (3, 16), generator=g)
    labels[0, :5] = IGNORE_INDEX
    results = []
    for fused in (False, True):
        model = build_model(cfg, seed=0)
        # SGD at lr 1: the weights after the step are w - grad, so they compare the gradients themselves.
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0),
                          LanguageModelStep(compile=compiled and fused, fused_loss=fused), lambda s: 1.0, 0.0)
        result = trainer.train_step(0, [{"inputs": inputs[:2], "labels": labels[:2]},
                                        {"inputs": inputs[2:], "labels": labels[2:]}])
        results.append((result, [p.detach().clone() for p in model.parameters()]))
    (plain, plain_w), (fused, fused_w) = results
    assert fused.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
    assert fused.grad_norm.item() == pytest.approx(plain.grad_norm.item(), rel=1e-4)
    for a, b in zip(fused_w, plain_w):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_stays_close_to_the_plain_path():
    hidden, weight, labels = (t.float() if t.is_floating_point() else t for t in _inputs(n=64, d=32, v=300))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        expected = F.cross_entropy((h1 @ w1.t()).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = linear_cross_entropy_sum(h2, w2, labels, chunk_tokens=16)
    expected.backward()
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-2)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=5e-2, atol=5e-2)
    assert w2.grad.dtype == torch.float32 and h2.grad.dtype == torch.float32
