"""Preference losses as pure functions of sequence log-probabilities (torchtune-style: no model inside).

Inputs are per-pair tensors of shape (B,):
- `policy_chosen`, `policy_rejected`: summed log p(response | prompt) under the policy,
- `ref_chosen`, `ref_rejected`: the same under the frozen reference (DPO, IPO),
- `*_tokens`: the number of response tokens (SimPO and ORPO use length-normalised log-probabilities).
Each returns (per-pair losses (B,), chosen rewards (B,), rejected rewards (B,)); the caller sums them and
the Trainer divides by the global number of pairs, so accumulation and data parallelism stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """Rafailov et al. 2023: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)); with
    label_smoothing eps, the conservative variant (cDPO) mixes in the flipped preference."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens,
             beta: float = 0.1):
    """Azar et al. 2023: (h - 1/(2 beta))^2 with h the difference of length-averaged log-ratios (as TRL)."""
    chosen_ratio = (policy_chosen - ref_chosen) / chosen_tokens
    rejected_ratio = (policy_rejected - ref_rejected) / rejected_tokens
    h = chosen_ratio - rejected_ratio
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta: float = 2.0,
               gamma: float = 0.5):
    """Meng et al. 2024: reference-free, -log sigmoid(beta * (avg logp chosen - avg logp rejected) - gamma)."""
    chosen_reward = beta * policy_chosen / chosen_tokens
    rejected_reward = beta * policy_rejected / rejected_tokens
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def orpo_loss(policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, lam: float = 0.1):
    """Hong et al. 2024: NLL of the chosen response plus lam * -log sigmoid(log odds ratio), with
    odds(y) = p / (1 - p) and p the length-normalised likelihood exp(mean token log-prob)."""
    chosen_avg = policy_chosen / chosen_tokens
    rejected_avg = policy_rejected / rejected_tokens
    # log(p / (1 - p)) = log p - log(1 - exp(log p)); log1p(-exp(x)) is exact for x < 0.
    log_odds = (chosen_avg - torch.log1p(-torch.exp(chosen_avg))) - (
        rejected_avg - torch.log1p(-torch.exp(rejected_avg)))
    ratio_loss = -F.logsigmoid(log_odds)
    losses = -chosen_avg + lam * ratio_loss
    return losses, lam * chosen_avg.detach(), lam * rejected_avg.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r(chosen) - r(rejected))."""
    return -F.logsigmoid(chosen_scores - rejected_scores)


# ---- KTO (align/kto.py) ------------------------------------------------------------------------------------

def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Ethayarajh et al. 2024 (as TRL's KTOTrainer): each completion alone, with r = policy - reference
    log-ratio and the reference point z = `kl` (an estimate of KL(policy || reference), detached, >= 0):
    lambda_D (1 - sigmoid(beta (r - z))) for a desirable completion, lambda_U (1 - sigmoid(beta (z - r))) for an
    undesirable one. Returns (per-completion losses (B,), rewards beta r (B,))."""
    ratio = policy_logps - ref_logps
    kl = kl.detach()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, beta * ratio.detach()


def kto_reference_point(policy_kl_sum: torch.Tensor, ref_kl_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """z_ref = max(0, mean over mismatched (prompt, completion) pairs of the policy - reference log-ratio),
    detached: from the sums of both log-probabilities and the pair count (sums add up over ranks)."""
    return ((policy_kl_sum - ref_kl_sum) / count.clamp(min=1)).clamp(min=0).detach()
