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
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        if cfg.bias_update_rate > 0 or cfg.selection_bias:
            # Added to the scores for top-k selection only, never to the combine weights (DeepSeek-V3).
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (logits (N, E), top-k weights (N, k) fp32, top-k expert ids (N, k))."""
        logits = F.linear(x, self.weight)
        scores = logits.float().softmax(-1) if self.score_func == "softmax" else logits.float().sigmoid()
        select = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1:
            select = limit_to_groups(select, self.n_group, self.topk_group)
        idx = torch.topk(select, self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return logits, weights, idx


def limit_to_groups(select: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited routing: experts form n_group equal groups, a group scores the sum of its two
    best selection scores, and only experts of the topk_group best groups stay selectable (others -inf)."""
    n, e = select.shape
    grouped = select.view(n, n_group, e // n_group)
    best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices  # (N, topk_group)
    keep = torch.zeros(n, n_group, dtype=torch.bool, device=select.device).scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, e)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights. forward takes tokens already sorted by expert.

    Every expert matmul goes through `project(x, name, layout)`, so a subclass can add to one projection
    (per-expert LoRA, finetune/lora.py) without knowing how the groups are laid out."""

    use_grouped_mm = True  # CUDA's grouped GEMM where it fits; a subclass may opt out (fp32 adapters)
    fused_cpu_loop = True  # CPU: gate and up as one matmul per expert; a subclass that adds to `project` opts out

    def __init__(self, n_experts: int, dim: int, ffn_dim: int):
        super().__init__()
        _keep_split_out_of_compile()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, ffn_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, ffn_dim))

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (N, dim), rows grouped by expert in order 0..E-1; tokens_per_expert (E,) int, summing to N."""
        if self.use_grouped_mm and _grouped_mm_fits(x, self.gate_proj):
            return self._swiglu(x, GroupedLayout(tokens_per_expert, x.shape[0]))
        if x.is_cuda:
            return self._swiglu(x, PaddedLayout(tokens_per_expert, x.shape[0]))
        return self._forward_split(x, tokens_per_expert)

    # Kept out of torch.compile (its per-expert sizes change every step: a recompile each time otherwise) by
    # _keep_split_out_of_compile, at the first construction.
    def _forward_split(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        layout = SplitLayout(tokens_per_expert, x.shape[0])
        if not self.fused_cpu_loop:
            return self._swiglu(x, layout)
        # One pass per expert over its rows (views): gate and up in one matmul, one concatenation at the end.
        gate_up = torch.cat([self.gate_proj, self.up_proj], dim=1).unbind(0)  # E x (2 ffn, dim)
        outs = []
        for rows, w_gate_up, w_down in zip(x.split(layout.sizes), gate_up, self.down_proj.unbind(0)):
            gate, up = (rows @ w_gate_up.T).chunk(2, dim=-1)
            outs.append((F.silu(gate) * up) @ w_down.T)
        return torch.cat(outs)

    def _swiglu(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        if layout.empty:
            return x.new_zeros(x.shape[0], self.down_proj.shape[1])
        xg = layout.pack(x)
        h = F.silu(self.project(xg, "gate_proj", layout)) * self.project(xg, "up_proj", layout)
        return layout.unpack(self.project(h, "down_proj", layout))

    def project(self, x: torch.Tensor, name: str, layout: Layout) -> torch.Tensor:
        return layout.matmul(x, getattr(self, name))


def _keep_split_out_of_compile() -> None:
    """Wrap GroupedExperts._forward_split in torch.compiler.disable, once. Done at the first construction rather
    than as a decorator because applying it imports torch._dynamo, seconds of start-up that every command would
    pay at import time while only models with experts need it. The class attribute stays a plain function, so
    a deep copy of the module (a reference model) calls its own weights."""
    if not getattr(GroupedExperts._forward_split, "_cybertron_uncompiled", False):
        split = torch.compiler.disable(GroupedExperts._forward_split)
        split._cybertron_uncompiled = True
        GroupedExperts._forward_split = split


class GroupedLayout:
    """Rows stay flat, (rows, dim), each expert's run starting on a multiple of ALIGN rows (the grouped GEMM
    kernels' alignment); a grouped matmul multiplies each run by its expert's weight (CUDA, bf16). Sizes are
    bounded from above (N + E x (ALIGN - 1) rows), so nothing waits on the device for the counts."""

    ALIGN = 16

    def __init__(self, tokens_per_expert: torch.Tensor, n_rows: int):
        counts = tokens_per_expert.to(torch.long)
        n_experts = counts.shape[0]
        aligned = (counts + self.ALIGN - 1) // self.ALIGN * self.ALIGN
        ends = aligned.cumsum(0)
        self.offs = ends.to(torch.int32)
        expert = torch.repeat_interleave(torch.arange(n_experts, device=counts.device), counts, output_size=n_rows)
        slot = torch.arange(n_rows, device=counts.device) - (counts.cumsum(0) - counts)[expert]
        self.rows = (ends - aligned)[expert] + slot  # where each input row sits in the aligned buffer
        self.size = n_rows + n_experts * (self.ALIGN - 1)
        self.empty = n_rows == 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        return x.new_zeros(self.size, x.shape[-1]).index_copy(0, self.rows, x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.rows]

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (rows, in) @ weight[e].T per group; weight (E, out, in). Rows past offs[-1] come out as zeros."""
        grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
        return grouped_mm(x.to(torch.bfloat16), weight.to(torch.bfloat16).transpose(-2, -1), offs=self.offs)


class SplitLayout:
    """CPU: each expert's rows as a view of the sorted rows, one matmul per expert: exactly the work routed, no
    padding. Measured faster on CPU than batched matmuls over rows padded to the busiest expert, which
    multiply by the load imbalance (bench/RESULTS.md, "MoE"); torch._grouped_mm runs forward on CPU in torch
    2.13 but its backward fails there."""

    def __init__(self, tokens_per_expert: torch.Tensor, n_rows: int):
        self.sizes = tokens_per_expert.tolist()
        self.empty = n_rows == 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ weight[e].T per expert's rows; weight (E, out, in). unbind, not weight[e]: its backward
        stacks the E gradients once instead of adding E weight-sized zero tensors."""
        return torch.cat([rows @ w.T for rows, w in zip(x.split(self.sizes), weight.unbind(0))])


class PaddedLayout:
    """Rows scattered into (E, capacity, dim), capacity = the busiest expert's count, then batched matmuls:
    CUDA outside the grouped GEMM's conditions (fp32, unaligned sizes)."""

    def __init__(self, tokens_per_expert: torch.Tensor, n_rows: int):
        counts = tokens_per_expert.to(torch.long)
        self.n_experts = counts.shape[0]
        self.capacity = int(counts.max()) if n_rows else 0  # a host sync; the GPU path avoids it
        self.empty = self.capacity == 0
        device = counts.device
        self.expert = torch.repeat_interleave(torch.arange(self.n_experts, device=device), counts,
                                              output_size=n_rows)
        self.slot = torch.arange(n_rows, device=device) - (counts.cumsum(0) - counts)[self.expert]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(self.n_experts, self.capacity, x.shape[-1])
        return padded.index_put((self.expert, self.slot), x)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.expert, self.slot]

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (E, capacity, in) @ weight[e].T per expert; weight (E, out, in)."""
        return torch.bmm(x, weight.transpose(1, 2))


def _grouped_mm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA's grouped GEMM (torch 2.9+: compute capability 8.0+) takes bf16 with rows 16-byte aligned (dim and
    ffn multiples of 8 elements): bf16 tensors (FSDP's bf16 parameters), or fp32 ones under bf16 autocast
    (cast here, as autocast casts a matmul). On CPU torch 2.13 runs it forward but its backward fails."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(x.device) >= (8, 0)):
        return False
    if x.shape[-1] % 8 or weight.shape[1] % 8 or weight.shape[2] % 8:
        return False
    autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    return autocast_bf16 or (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16)


Layout = GroupedLayout | SplitLayout | PaddedLayout  # how an expert's rows meet its weight


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
        self.aux_loss_coef = cfg.aux_loss_coef  # read by train/moe_balance.py
        self.bias_update_rate = cfg.bias_update_rate
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
        # scatter_add, not bincount: a fixed output shape (torch.compile traces it without a graph break).
        tokens_per_expert = flat.new_zeros(self.n_experts).scatter_add_(0, flat, torch.ones_like(flat))
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
