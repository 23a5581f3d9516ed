"""The online methods' advantage estimators and PPO's losses against numbers computed by hand or by plain
loops written here: RLOO, REINFORCE++, GAE, the clipped policy and value losses, and the value head."""

import math

import pytest
import torch

from cybertron.align.advantages import (
    discounted_returns,
    gae,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    shaped_rewards,
    whiten,
)
from cybertron.align.grpo import GRPOStep
from cybertron.align.ppo import PPOStep, attach_value_head, clipped_value_loss, logprobs_and_values
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.losses import next_token_logprobs


def _close(got, expected, atol):
    torch.testing.assert_close(got.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


def test_rloo_subtracts_the_mean_of_the_other_completions():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 3.0, 1.0, 0.0, 2.0])
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0, 3 - 1.0, 1 - 5 / 3, 0 - 2.0, 2 - 4 / 3]
    assert rloo_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)
    # = k/(k-1) times the unscaled group advantage (Dr. GRPO's): the two differ by a constant factor only
    assert rloo_advantages(rewards, 4).tolist() == pytest.approx(
        (group_advantages(rewards, 4, scale=False) * 4 / 3).tolist(), abs=1e-6)


def _mask():
    # Row 0: completion at positions 2..4; row 1: positions 2..3 (then padding).
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 2:4] = True
    return mask


def test_shaped_rewards_put_the_kl_on_every_token_and_the_reward_on_the_last():
    mask = _mask()
    logp = torch.tensor([[0, -1, -1.0, -2.0, -0.5, 0], [0, -1, -0.2, -0.4, -9, -9]])
    ref = torch.tensor([[0, -3, -1.5, -1.0, -0.5, 0], [0, -2, -0.2, -0.1, -1, -1]])
    got = shaped_rewards(torch.tensor([1.0, -2.0]), mask, logp, ref, kl_coef=0.1)
    expected = [[0, 0, -0.05, 0.1, 0 + 1.0, 0], [0, 0, 0, 0.03 - 2.0, 0, 0]]
    _close(got, expected, 1e-6)


def test_reinforce_pp_is_globally_normalised_discounted_returns():
    mask = _mask()
    logp = torch.tensor([[0, 0, -1.0, -2.0, -0.5, 0], [0, 0, -0.2, -0.4, 0, 0]])
    ref = torch.tensor([[0, 0, -1.5, -1.0, -0.5, 0], [0, 0, -0.2, -0.1, 0, 0]])
    gamma = 0.9
    # token rewards: row 0 [-0.05, 0.1, 1.0]; row 1 [0, 0.03 - 2]
    returns = [[-0.05 + gamma * (0.1 + gamma * 1.0), 0.1 + gamma * 1.0, 1.0], [0 + gamma * -1.97, -1.97]]
    flat = returns[0] + returns[1]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 5)  # biased, over the batch's tokens
    got = reinforce_pp_advantages(torch.tensor([1.0, -2.0]), mask, logp, ref, 0.1, gamma)
    expected = torch.zeros(2, 6)
    expected[0, 2:5] = torch.tensor([(x - mean) / std for x in returns[0]])
    expected[1, 2:4] = torch.tensor([(x - mean) / std for x in returns[1]])
    _close(got, expected, 1e-5)


def test_whitening_over_ranks_equals_whitening_the_whole_batch():
    x, mask = torch.randn(4, 7), torch.rand(4, 7) > 0.3
    whole = whiten(x, mask)
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):  # two "ranks" whose sums are added as an all-reduce would
        other = slice(2, 4) if rows.start == 0 else slice(0, 2)
        xo, mo = x[other].double() * mask[other], mask[other].double()
        extra = torch.stack([xo.sum(), (xo * xo).sum(), mo.sum()])
        halves.append(whiten(x[rows], mask[rows], lambda sums, extra=extra: sums + extra))
    _close(torch.cat(halves), whole, 1e-6)


def _gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion per row over its completion positions only."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        positions = [t for t in range(rewards.shape[1]) if mask[i, t]]
        last = 0.0
        for k in reversed(range(len(positions))):
            t = positions[k]
            next_v = values[i, positions[k + 1]].item() if k + 1 < len(positions) else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
            ret[i, t] = last + values[i, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_reference_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[0, 2:8], mask[1, 3:5], mask[2, 1:7] = True, True, True
    adv, ret = gae(rewards * mask, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards * mask, values, mask, gamma, lam)
    _close(adv, ref_adv, 1e-6)
    _close(ret, ref_ret, 1e-6)
    if lam == 1.0:  # lambda = 1: advantage = Monte-Carlo return - value
        mc = discounted_returns(rewards * mask, mask, gamma)
        _close(adv, (mc - values) * mask, 1e-5)


def test_clipped_value_loss_closed_form():
    values, old, returns = torch.tensor([1.0, 1.0, 0.0, 0.5]), torch.tensor([0.5, 1.2, 0.0, 0.5]), \
        torch.tensor([2.0, 0.0, 1.0, 0.5])
    got = clipped_value_loss(values, old, returns, clip=0.2)
    # 0: V moved +0.5 towards R: clipped V = 0.7 is further from R=2 -> 0.5 * 1.3^2
    # 1: V moved -0.2 (inside the range) -> 0.5 * 1^2; 2: unchanged -> 0.5 * 1; 3: at the target -> 0
    assert got.tolist() == pytest.approx([0.5 * 1.3 ** 2, 0.5, 0.5, 0.0], abs=1e-6)


def test_clipped_policy_loss_with_token_advantages_closed_form():
    step = GRPOStep(clip_eps=0.2, kl_coef=0.0)
    old = torch.zeros(1, 5)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1, 0.9]]))  # ratios, old = 0
    adv = torch.tensor([[0.0, 2.0, -1.0, 1.0, -1.0, 0.0]])  # column t: the token at t (column 0 unused)
    batch = {"old_logprobs": torch.cat([torch.zeros(1, 1), old], 1), "advantages": adv}
    per_token, metrics = step.policy_loss(logp, batch, torch.ones(1, 5))
    # -min(ratio A, clip(ratio) A): 1.0*2 ; 1.5 clipped to 1.2 for A=-1 -> min(-1.5, -1.2) = -1.5 (not
    # clipped: the ratio left in the direction that makes the loss worse); 0.5*1 vs 0.8*1 -> 0.5; 1.1*-1
    _close(per_token, [[-2.0, 1.5, -0.5, 1.1, 0.0]], 1e-6)
    assert metrics["clip_fraction"].item() == 2  # ratios 1.5 and 0.5 are outside [0.8, 1.2]


@pytest.fixture
def model():
    return attach_value_head(build_model(preset_config("debug"), seed=0))


def test_value_head_starts_at_zero_and_shares_the_policys_forward(model):
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    logp, values = logprobs_and_values(model, ids)
    assert torch.equal(logp, next_token_logprobs(model(ids), ids))
    assert values.shape == (2, 6) and not values.any()


def test_ppo_step_is_policy_loss_plus_weighted_value_loss(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.1, generator=g)
    ids = torch.randint(0, 256, (2, 7), generator=g)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 3:] = True
    mask[1, 6] = False
    batch = {"seq_ids": ids, "seq_mask": mask, "advantages": torch.randn(2, 7, generator=g),
             "old_values": torch.randn(2, 7, generator=g), "returns": torch.randn(2, 7, generator=g)}
    step = PPOStep(clip_eps=0.2, value_clip=0.3, vf_coef=0.5)
    loss, metrics = step(model, batch)
    logp, values = logprobs_and_values(model, ids)
    m = mask[:, 1:].float()
    # on-policy (ratio 1): the policy loss is -A per token
    value = 0.5 * torch.maximum((values - batch["returns"][:, 1:]) ** 2, (
        batch["old_values"][:, 1:] + (values - batch["old_values"][:, 1:]).clamp(-0.3, 0.3)
        - batch["returns"][:, 1:]) ** 2)
    expected = ((-batch["advantages"][:, 1:] + 0.5 * value) * m).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["value_loss"].item() == pytest.approx((value * m).sum().item(), rel=1e-5)
    loss.backward()
    assert model.value_head.weight.grad.abs().sum() > 0  # the critic learns through the one step


def test_kl_is_only_logged_when_it_is_shaped_into_the_rewards():
    logp, mask = torch.log(torch.tensor([[0.5, 0.25]])), torch.ones(1, 2)
    batch = {"advantages": torch.tensor([1.0]), "ref_logprobs": torch.log(torch.tensor([[1.0, 0.5, 0.5]]))}
    loss, metrics = GRPOStep(kl_coef=0.0).policy_loss(logp, batch, mask)
    _close(loss, [[-1.0, -1.0]], 1e-6)  # on-policy: -A, no KL term
    delta = torch.log(torch.tensor([0.5 / 0.5, 0.5 / 0.25]))
    assert metrics["kl"].item() == pytest.approx(float((delta.exp() - delta - 1).sum()), abs=1e-6)
    with_kl, _ = GRPOStep(kl_coef=0.1).policy_loss(logp, batch, mask)
    _close(with_kl - loss, 0.1 * (delta.exp() - delta - 1)[None], 1e-6)
