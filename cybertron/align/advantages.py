"""Advantage estimators of the on-policy methods, as pure functions of rewards (and values).

Sequence-level (one number per completion; the KL to the reference stays a loss term, as in GRPO):
- grpo:        A_i = (r_i - mean_group) / (std_group + eps)   (Shao et al. 2024; scale=False: Dr. GRPO)
- rloo:        A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_group)   (Ahmadian et al. 2024)

Token-level (one number per completion token; the KL is shaped into the reward, as OpenRLHF does):
- reinforce++: r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)) at every completion token, plus the
               sequence reward at its last token; G_t = sum_{s >= t} gamma^(s - t) r_s; then
               A_t = (G_t - mean) / sqrt(var) with mean and (biased) var over every completion token of the
               global batch (Hu 2025, "REINFORCE++"; OpenRLHF's `reinforce_plus_plus` estimator).
- gae (ppo):   the same shaped rewards; delta_t = r_t + gamma V_{t+1} - V_t (V after the last token is 0),
               A_t = delta_t + gamma lambda A_{t+1}, returns R_t = A_t + V_t (the value targets); the
               advantages are then normalised over the global batch's tokens as above (TRL, OpenRLHF).

Token tensors are (N, L) aligned with the sequence: column t is the token at position t (column 0 is never a
completion token), `mask` marks completion tokens, and a completion's tokens are contiguous.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ESTIMATORS = ("grpo", "rloo", "reinforce++", "gae")
SumOverRanks = Callable[[torch.Tensor], torch.Tensor]  # sums a float64 vector over the data-parallel ranks


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per completion (std unbiased, as TRL); scale=False leaves the
    difference unscaled (Dr. GRPO). A group whose rewards are all equal gets zero advantage: no signal."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True)
        centered = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return centered.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline: each completion's reward minus the mean of the others of its group."""
    groups = rewards.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def shaped_rewards(rewards: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor | None,
                   ref_logprobs: torch.Tensor | None, kl_coef: float) -> torch.Tensor:
    """(N, L) token rewards: -kl_coef * (log pi - log pi_ref) on completion tokens (k1, whose sum over a
    completion estimates its KL), plus the sequence reward on each completion's last token."""
    mask = mask.float()
    out = torch.zeros_like(mask)
    if kl_coef > 0 and logprobs is not None and ref_logprobs is not None:
        out = -kl_coef * (logprobs - ref_logprobs) * mask
    last = last_token_index(mask)
    return out.scatter_add(1, last[:, None], rewards.float()[:, None])


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(N,) position of each row's last completion token (0 for a row without any)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over completion tokens (0 elsewhere)."""
    mask = mask.float()
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    for t in reversed(range(token_rewards.shape[1])):
        running = (token_rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over completion tokens: (advantages, returns),
    both (N, L) and 0 outside the mask. values[:, t] estimates the return from token t on."""
    mask = mask.float()
    values = values * mask
    advantages = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0], dtype=token_rewards.dtype, device=token_rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        # Past a completion's end (mask 0) the value and the carried advantage restart from 0.
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(token_values: torch.Tensor, mask: torch.Tensor, sum_over_ranks: SumOverRanks | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(max(var, eps)) with the mean and biased variance over every completion token of the
    global batch (`sum_over_ranks` adds the ranks' sums: every rank normalises with the same numbers)."""
    mask = mask.float()
    x = token_values.double() * mask
    sums = torch.stack([x.sum(), (x * x).sum(), mask.double().sum()])
    if sum_over_ranks is not None:
        sums = sum_over_ranks(sums)
    total, squares, n = sums.tolist()
    n = max(n, 1.0)
    mean = total / n
    var = max(squares / n - mean * mean, 0.0)
    return ((token_values - mean) / max(var, eps) ** 0.5 * mask).to(token_values.dtype)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor | None,
                            ref_logprobs: torch.Tensor | None, kl_coef: float, gamma: float = 1.0,
                            sum_over_ranks: SumOverRanks | None = None) -> torch.Tensor:
    """REINFORCE++: globally normalised discounted returns of the KL-shaped token rewards (module docstring)."""
    returns = discounted_returns(shaped_rewards(rewards, mask, logprobs, ref_logprobs, kl_coef), mask, gamma)
    return whiten(returns, mask, sum_over_ranks)
