"""Preference losses against closed-form values computed here with plain math (no torch functional code)."""

import math

import pytest
import torch

from cybertron.align.losses import bradley_terry_loss, dpo_loss, ipo_loss, orpo_loss, simpo_loss


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


PC, PR, RC, RR, NC, NR = -12.0, -15.0, -13.0, -14.0, 6.0, 5.0


def _t(*values):
    return [torch.tensor([v], dtype=torch.float64) for v in values]


def test_dpo_closed_form():
    beta = 0.1
    losses, cr, rr = dpo_loss(*_t(PC, PR, RC, RR), beta=beta)
    margin = (PC - RC) - (PR - RR)
    assert losses.item() == pytest.approx(-math.log(_sig(beta * margin)), abs=1e-12)
    assert cr.item() == pytest.approx(beta * (PC - RC)) and rr.item() == pytest.approx(beta * (PR - RR))


def test_dpo_is_ln2_when_policy_equals_reference():
    x = torch.randn(7, dtype=torch.float64)
    y = torch.randn(7, dtype=torch.float64)
    losses, _, _ = dpo_loss(x, y, x.clone(), y.clone(), beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2.0)), atol=1e-12)


def test_conservative_dpo_closed_form():
    beta, eps = 0.2, 0.1
    losses, _, _ = dpo_loss(*_t(PC, PR, RC, RR), beta=beta, label_smoothing=eps)
    z = beta * ((PC - RC) - (PR - RR))
    assert losses.item() == pytest.approx(-(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z)), abs=1e-12)


def test_ipo_closed_form():
    beta = 0.1
    losses, _, _ = ipo_loss(*_t(PC, PR, RC, RR, NC, NR), beta=beta)
    h = (PC - RC) / NC - (PR - RR) / NR
    assert losses.item() == pytest.approx((h - 1 / (2 * beta)) ** 2, abs=1e-12)


def test_simpo_closed_form():
    beta, gamma = 2.0, 0.5
    losses, _, _ = simpo_loss(*_t(PC, PR, NC, NR), beta=beta, gamma=gamma)
    z = beta * PC / NC - beta * PR / NR - gamma
    assert losses.item() == pytest.approx(-math.log(_sig(z)), abs=1e-12)


def test_orpo_closed_form():
    lam = 0.25
    losses, _, _ = orpo_loss(*_t(PC, PR, NC, NR), lam=lam)
    pc, pr = math.exp(PC / NC), math.exp(PR / NR)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    expected = -PC / NC - lam * math.log(_sig(log_odds))
    assert losses.item() == pytest.approx(expected, abs=1e-10)


def test_bradley_terry_closed_form_and_gradient_direction():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.9], requires_grad=True)
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(-math.log(_sig(0.3 - 0.9)), abs=1e-6)
    loss.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected
