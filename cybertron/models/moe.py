"""Mixture-of-experts feed-forward block: a router picks top-k experts per token, every token reaches all
of its k experts (dropless: no capacity, nothing dropped), and the experts run as one grouped computation
over tokens sorted by expert.

The pieces, in HF's names so conversion stays a rename table (models/hf.py):
- `gate`: the router (`mlp.gate.weight`, (E, dim)); with `bias_update_rate` > 0 it also holds the
  DeepSeek-V3 selection bias `e_score_correction_bias` (E,), a buffer, so checkpoints carry it.
- `experts`: GroupedExperts, stacked SwiGLU weights `gate_proj` (E, ffn, dim), `up_proj` (E, ffn, dim),
  `down_proj` (E, dim, ffn).
- `shared_expert` (+ `shared_expert_gate` for Qwen2-MoE's sigmoid gate): a dense MLP every token passes.

Expert parallelism wraps `experts` from outside (all-to-all dispatch before its forward, combine after):
`GroupedExperts.forward(x_sorted, tokens_per_expert)` sees only tokens already sorted by expert, so this
file knows nothing of it.

Load balancing is reported, not applied, here: each training forward (grad enabled) appends a RouterStats
to `MoE.router_stats`; the trainer drains them after each micro-batch (train/moe_balance.py) to add the
auxiliary loss and, after each optimizer step, to move the selection bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cybertron.models.config import ModelConfig


@dataclass
class RouterStats:
    """One forward's routing, for balancing. prob_sum keeps its graph (the auxiliary loss differentiates it)."""

    prob_sum: torch.Tensor  # (E,) sum over tokens of the softmax router probabilities
    counts: torch.Tensor  # (E,) float, how many (token, slot) assignments each expert received
    n_tokens: int


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        if cfg.bias_update_rate > 0:
            # Added to the scores for top-k selection only, never to the combine weights (DeepSeek-V3).
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (logits (N, E), top-k weights (N, k) fp32, top-k expert ids (N, k))."""
        logits = F.linear(x, self.weight)
        scores = logits.float().softmax(-1) if self.score_func == "softmax" else logits.float().sigmoid()
        select = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        idx = torch.topk(select, self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return logits, weights, idx


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights. forward takes tokens already sorted by expert."""

    def __init__(self, n_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (N, dim), rows grouped by expert in order 0..E-1; tokens_per_expert (E,) int, summing to N."""
        if x.is_cuda and _grouped_mm_fits(x, self.gate_proj):
            return self._forward_grouped_mm(x, tokens_per_expert)
        return self._forward_padded(x, tokens_per_expert)

    def _forward_grouped_mm(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, self.gate_proj.transpose(-2, -1), offs=offs))
        h = h * torch._grouped_mm(x, self.up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs)

    def _forward_padded(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # Scatter rows into (E, capacity, dim) with capacity = the busiest expert's count, run three
        # batched matmuls, gather the rows back. Measured faster on CPU than a loop over experts
        # (bench/RESULTS.md, "MoE").
        n_experts = tokens_per_expert.shape[0]
        counts = tokens_per_expert.to(torch.long)
        capacity = int(counts.max()) if counts.numel() else 0
        if capacity == 0:
            return x.new_zeros(x.shape[0], self.down_proj.shape[1])
        expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts,
                                         output_size=x.shape[0])
        starts = counts.cumsum(0) - counts
        slot = torch.arange(x.shape[0], device=x.device) - starts[expert]
        padded = x.new_zeros(n_experts, capacity, x.shape[1])
        padded = padded.index_put((expert, slot), x)
        h = F.silu(torch.bmm(padded, self.gate_proj.transpose(1, 2))) * torch.bmm(padded, self.up_proj.transpose(1, 2))
        out = torch.bmm(h, self.down_proj.transpose(1, 2))  # (E, capacity, dim)
        return out[expert, slot]


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # CUDA's grouped GEMM takes bf16 with rows 16-byte aligned (dim and ffn multiples of 8 elements).
    return (hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0)


class SharedExpert(nn.Module):
    """A dense SwiGLU MLP every token passes (HF names: shared_expert.{gate,up,down}_proj)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.expert_ffn_dim)
        self.shared_expert = SharedExpert(cfg.dim, cfg.shared_ffn_dim) if cfg.shared_ffn_dim else None
        self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.router_stats: list[RouterStats] = []  # drained by the trainer; see the module docstring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits, weights, idx = self.gate(x)  # (N, E), (N, k), (N, k)
        flat = idx.reshape(-1)  # (N*k,) expert of each (token, slot)
        order = flat.argsort(stable=True)  # (token, slot) pairs sorted by expert
        token = order // self.top_k
        tokens_per_expert = torch.bincount(flat, minlength=self.n_experts)
        y = self.experts(x[token], tokens_per_expert)  # (N*k, dim)
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.training and torch.is_grad_enabled():
            self.router_stats.append(RouterStats(logits.float().softmax(-1).sum(0),
                                                 tokens_per_expert.detach().float(), x.shape[0]))
        return out.reshape(shape)
