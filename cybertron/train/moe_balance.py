"""Load balancing of mixture-of-experts layers, for every training method alike (the Trainer calls it).

Each MoE layer records its routing on every training forward (models/moe.py, `MoE.router_stats`). Per
micro-batch the trainer drains them here and backpropagates the auxiliary loss with the task's loss; per
optimizer step it logs each layer's expert load and moves the auxiliary-loss-free selection bias.

- Auxiliary loss (Switch Transformer eq. 4-6, as transformers computes it for Mixtral / Qwen-MoE):
  E x sum_e f_e x P_e over the routing of all MoE layers together, f_e the fraction of (token, slot)
  assignments to expert e (summing to top_k), P_e the mean router probability of e. Weighted by
  `aux_loss_coef` and added to the mean task loss, as HF adds router_aux_loss_coef x aux_loss.
- Auxiliary-loss-free balancing (DeepSeek-V3): after each optimizer step, every layer's selection bias
  moves by rate x sign(mean load - load), with the loads of the whole step summed over data-parallel ranks.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from cybertron.models.moe import MoE, RouterStats


class RouterBalance:
    """The MoE layers of one model and what their routing did during the current optimizer step."""

    def __init__(self, layers: list[tuple[str, MoE]]):
        self.layers = layers
        self.n_experts = layers[0][1].n_experts
        self.aux_loss_coef = layers[0][1].aux_loss_coef
        self.bias_update_rate = layers[0][1].bias_update_rate
        self._counts = torch.zeros(len(layers), self.n_experts)
        self._aux_sum = torch.zeros(())
        self._aux_weight = torch.zeros(())

    @classmethod
    def of(cls, model: nn.Module) -> RouterBalance | None:
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
        return cls(layers) if layers else None

    def micro_batch_loss(self, units: torch.Tensor) -> torch.Tensor | None:
        """Drain the routing recorded since the last call; return aux_loss_coef x aux x units, to add to the
        micro-batch's summed loss (the trainer divides sums by the global unit count), or None."""
        stats = self._drain()
        if not any(stats):
            return None
        aux = balancing_loss(stats, self.n_experts)
        self._aux_sum = self._aux_sum.to(aux.device) + aux.detach().float() * units.float()
        self._aux_weight = self._aux_weight.to(aux.device) + units.float()
        return self.aux_loss_coef * aux * units if self.aux_loss_coef > 0 else None

    def discard(self) -> None:
        """Drop records of forwards that are not a micro-batch's own (activation checkpointing recomputes
        blocks during backward), keeping their counts out of the step."""
        for _, moe in self.layers:
            moe.router_stats.clear()

    def end_step(self, sum_over_dp: Callable[[torch.Tensor], torch.Tensor], stepped: bool) -> dict[str, float]:
        """After the optimizer step: move the selection biases (when the step was taken) and return the
        step's metrics, each layer's max/mean tokens per expert and the balancing loss (without its weight)."""
        self._drain()  # a strategy that never called micro_batch_loss (pipeline schedules): counts only
        counts = sum_over_dp(self._counts)  # (layers, E), summed over the whole step and every replica
        if stepped and self.bias_update_rate > 0:
            self._update_biases(counts)
        metrics = {}
        for (name, _), load in zip(self.layers, counts):
            if load.sum() > 0:
                metrics[f"moe_load_max_mean_{_layer_label(name)}"] = (load.max() / load.mean()).item()
        if self._aux_weight.item() > 0:
            metrics["moe_aux_loss"] = (sum_over_dp(self._aux_sum) / sum_over_dp(self._aux_weight)).item()
        self._counts = torch.zeros_like(self._counts)
        self._aux_sum, self._aux_weight = torch.zeros(()), torch.zeros(())
        return metrics

    @torch.no_grad()
    def _update_biases(self, counts: torch.Tensor) -> None:
        for (_, moe), load in zip(self.layers, counts):
            bias = moe.gate.e_score_correction_bias
            if bias is not None:
                step = torch.sign(load.mean() - load) * self.bias_update_rate
                bias.add_(step.to(device=bias.device, dtype=bias.dtype))

    def _drain(self) -> list[list[RouterStats]]:
        drained = []
        for i, (_, moe) in enumerate(self.layers):
            stats, moe.router_stats = moe.router_stats, []
            for s in stats:
                self._counts = self._counts.to(s.counts.device)
                self._counts[i] += s.counts
            drained.append(stats)
        return drained


def balancing_loss(stats: list[list[RouterStats]], n_experts: int) -> torch.Tensor:
    """E x sum_e f_e P_e over every recorded forward of every layer (transformers' load_balancing_loss_func
    over the concatenated router logits of all layers)."""
    records = [s for layer in stats for s in layer]
    tokens = sum(s.n_tokens for s in records)
    counts = torch.stack([s.counts for s in records]).sum(0)
    probs = torch.stack([s.prob_sum for s in records]).sum(0)
    return n_experts * (counts / tokens * (probs / tokens)).sum()


def _layer_label(name: str) -> str:
    m = re.search(r"layers\.(\d+)\.", name + ".")
    return m.group(1) if m else name
