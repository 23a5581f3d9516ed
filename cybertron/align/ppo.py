"""PPO with a critic (Schulman et al. 2017; Ouyang et al. 2022) on GRPO's rollouts.

The critic is a linear value head on the policy's final hidden states (`value_head`, one output), not a
separate value model: one forward gives the token log-probabilities and the values, the head is one more
trainable parameter of the one model (so the one optimizer, checkpoint and resume carry it with the policy,
adapters alone under LoRA plus the head), and no second copy of the base is held. The price is that the
value loss also moves the shared weights; align.vf_coef weighs it.

The head is called inside the model's forward (the `head` callback, as the fused output head is), where
FSDP2 has gathered the root's parameters; a run dir's checkpoints keep `value_head.weight` next to the
policy's weights, which loading a plain Transformer (generate, serve, export) does not ask for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from cybertron.align.grpo import GRPOStep, row_batches
from cybertron.train.losses import next_token_logprobs
from cybertron.train.trainer import Batch, to_device

VALUE_HEAD = "value_head"


def attach_value_head(model: nn.Module) -> nn.Module:
    """`model` with a zero-initialised linear value head (dim -> 1): every value starts at 0, so the first
    advantages are the shaped returns themselves, and the same for every seed and layout."""
    weight = model.embed_tokens.weight
    head = nn.Linear(model.config.dim, 1, bias=False, device=weight.device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    setattr(model, VALUE_HEAD, head)
    return model


def logprobs_and_values(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T-1) log p(ids[t] | ids[<t]) and (B, T-1) fp32 value of the state before ids[t] (t >= 1), in one
    forward through `model` (a DDP wrapper or the plain module)."""
    value_head = getattr(getattr(model, "module", model), VALUE_HEAD)

    def head(h: torch.Tensor, lm_head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        return lm_head(h), value_head(h.float()).squeeze(-1)

    logits, values = model(ids, head=head)
    return next_token_logprobs(logits, ids), values[:, :-1].float()


@torch.no_grad()
def rollout_logprobs_and_values(model: nn.Module, rows: Batch, batch_size: int, device: torch.device,
                                autocast: Callable[[], contextlib.AbstractContextManager]
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) log-probabilities and values of the rollout rows before any update (column t: the token at t,
    column 0 is 0), the old policy and old critic of the PPO losses."""
    width = rows["seq_ids"].shape[1]
    was_training = model.training
    model.eval()
    logps, values = [], []
    for batch in row_batches(rows, batch_size):
        ids = to_device(batch, device)["seq_ids"]
        with autocast():
            logp, value = logprobs_and_values(model, ids)
        logps.append(nn.functional.pad(logp.float().cpu(), (1, width - 1 - logp.shape[1])))
        values.append(nn.functional.pad(value.cpu(), (1, width - 1 - value.shape[1])))
    model.train(was_training)
    return torch.cat(logps), torch.cat(values)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per token 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) (PPO2, OpenAI baselines)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


class PPOStep(GRPOStep):
    """GRPO's clipped policy loss on token advantages (GAE), plus vf_coef times the clipped value loss.

    Batch: as GRPOStep (advantages (N, L), old_logprobs) plus old_values and returns, (N, L) aligned with the
    sequence. The KL to the reference is shaped into the rewards at rollout time, not a loss term here."""

    def __init__(self, clip_eps: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1,
                 loss_type: str = "token", check: bool = False, tolerance: float = 1e-5):
        super().__init__(clip_eps, 0.0, loss_type, check, tolerance)
        self.value_clip, self.vf_coef = value_clip, vf_coef

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["seq_ids"]
        mask = batch["seq_mask"][:, 1:].float()
        logp, values = logprobs_and_values(model, ids)
        policy, metrics = self.policy_loss(logp, batch, mask)
        value = clipped_value_loss(values, batch["old_values"][:, 1:], batch["returns"][:, 1:], self.value_clip)
        metrics["value_loss"] = self._reduce(value.detach(), mask)
        metrics["value"] = self._reduce(values.detach(), mask)
        return self._reduce(policy + self.vf_coef * value, mask), metrics
