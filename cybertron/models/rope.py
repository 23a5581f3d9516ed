"""Rotary position embeddings in Hugging Face's convention (rotate_half over two contiguous halves).

Matching HF exactly (same frequencies, fp32 cos/sin, the same half rotation) is what lets checkpoints move
between cybertron and `transformers` with a rename table and no permutation of q/k weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None, device=None) -> torch.Tensor:
    """Per-pair rotation frequencies, with Llama 3's long-context scaling when `scaling` asks for it."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin, each (batch, seq, head_dim), for integer positions of shape (batch, seq).

    The sin's first half is negated so apply_rope can rotate with one flip instead of HF's slice + negate +
    cat: the products are the same floating-point operations (negation is exact), so results are bitwise
    HF's, while backward avoids two zero-filled slice gradients per tensor."""
    # Computed in fp32 whatever the autocast state, as HF does: bf16 angles lose whole radians at 8k.
    with torch.autocast(device_type=positions.device.type, enabled=False):
        freqs = positions[..., None].float() * inv_freq.float().to(positions.device)
        sin = freqs.sin()
        return torch.cat((freqs, freqs), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by angles given as cos and signed sin (batch, seq, head_dim):
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as [x2, x1] * [-sin, sin]."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos.unsqueeze(2) + swapped * signed_sin.unsqueeze(2)
