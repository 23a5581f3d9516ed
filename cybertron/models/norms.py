"""RMSNorm in the two conventions Hugging Face families use, chosen by config (ModelConfig.norm_plus_one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # PyTorch's fused kernel: the same arithmetic as below in fp32 (bitwise equal in our tests), with
            # fewer kernels forward and backward (a small saving per training step; bench/RESULTS.md).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 and cast back before the scale, exactly as HF does (parity under bf16 too).
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class PlusOneRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the scale is (1 + weight), weights start at 0, and the scale is applied in fp32 before
    the cast back (HF's Gemma order, unlike Llama's cast-then-scale)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


def rms_norm(dim: int, eps: float, plus_one: bool) -> RMSNorm:
    return PlusOneRMSNorm(dim, eps) if plus_one else RMSNorm(dim, eps)
