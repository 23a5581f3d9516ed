"""LoRA on the stacked expert weights of a mixture of experts: one low-rank pair per expert.

`LoRAExperts` replaces a `GroupedExperts` (models/moe.py) and keeps its frozen weights under the same names
(`gate_proj` (E, ffn, dim), ...), so checkpoint keys of the base still apply. For each targeted projection
W (E, out, in) it adds `lora_A.<proj>` (E, rank, in) and `lora_B.<proj>` (E, out, rank):

    y_e = x W_e^T + s x A_e^T B_e^T        s = alpha / rank,  B = 0 at start (the output is unchanged)

The low-rank product runs inside the experts' own grouped layout (`project`), on tokens sorted by expert.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cybertron.models.moe import GroupedExperts, Layout

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class LoRAExperts(GroupedExperts):
    # Adapters are fp32 (master weights) over a base that may be bf16: the grouped GEMM takes one dtype.
    use_grouped_mm = False
    fused_cpu_loop = False  # every matmul goes through `project`, which adds the adapters

    def __init__(self, base: GroupedExperts, targets: list[str], rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)
        for name in PROJECTIONS:
            setattr(self, name, nn.Parameter(getattr(base, name).detach(), requires_grad=False))
        self.rank, self.scale = rank, alpha / rank
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in targets:
            n_experts, out_dim, in_dim = getattr(base, name).shape
            device = getattr(base, name).device
            bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, as LoRALinear's lora_A
            a = torch.empty(n_experts, rank, in_dim).uniform_(-bound, bound, generator=generator)
            self.lora_A[name] = nn.Parameter(a.to(device))
            self.lora_B[name] = nn.Parameter(torch.zeros(n_experts, out_dim, rank, device=device))
        self.disabled = False  # True inside `adapters_disabled`

    def project(self, x: torch.Tensor, name: str, layout: Layout) -> torch.Tensor:
        base = layout.matmul(x, getattr(self, name))
        if self.disabled or name not in self.lora_A:
            return base
        a, b = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
        return base + layout.matmul(layout.matmul(x, a), b) * self.scale

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """W + s B A per expert, fp32."""
        weight = getattr(self, name).float()
        if name not in self.lora_A:
            return weight
        return weight + torch.bmm(self.lora_B[name].float(), self.lora_A[name].float()) * self.scale

    def merged(self) -> GroupedExperts:
        n_experts, ffn_dim, dim = self.gate_proj.shape
        plain = GroupedExperts(n_experts, dim, ffn_dim).to(self.gate_proj.device)
        for name in PROJECTIONS:
            setattr(plain, name, nn.Parameter(self.merged_weight(name).to(getattr(self, name).dtype)))
        return plain

    def extra_repr(self) -> str:
        return f"lora on {', '.join(self.lora_A)} rank={self.rank}, scale={self.scale:g}"
