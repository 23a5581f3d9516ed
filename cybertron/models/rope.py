"""Rotary position embeddings in Hugging Face's convention (rotate_half over two contiguous halves).

Matching HF exactly (same frequencies, fp32 cos/sin, the same half rotation) is what lets checkpoints move
between cybertron and `transformers` with a rename table and no permutation of q/k weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Scaling types whose frequencies depend on the length of the sequence being run (see Rotary).
_LENGTH_DEPENDENT = ("dynamic", "longrope")
_TYPES = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling type, in transformers' current spelling ("su", Phi-3's first name for LongRoPE, included)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"
    return "longrope" if kind == "su" else kind


def check_scaling(scaling: dict[str, Any] | None, rotary_dim: int) -> None:
    """ValueError naming what is wrong, so a bad config fails at load rather than at the first forward."""
    kind = rope_type(scaling)
    if kind not in _TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not implemented; supported: {', '.join(_TYPES)}")
    missing = [key for key in _REQUIRED.get(kind, ()) if (scaling or {}).get(key) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != rotary_dim // 2:
                raise ValueError(f"rope_scaling.{key} has {len(scaling[key])} entries, expected {rotary_dim // 2}")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None, device=None,
                        seq_len: torch.Tensor | None = None, max_position: int | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim // 2,) of a rotary dimension `head_dim`, scaled as `scaling`
    asks. The length-dependent types take `seq_len`, an int64 tensor (B, 1) of each row's largest position + 1,
    and return (B, 1, head_dim // 2); `max_position` is HF's max_position_embeddings. Each formula is
    transformers' own, operation for operation and dtype for dtype, for bitwise parity."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    kind = rope_type(scaling)
    if kind == "default":
        return 1.0 / (theta**exponents)
    if kind == "llama3":
        return _llama3_scaled(1.0 / (theta**exponents), scaling)
    if kind == "linear":
        return 1.0 / (theta**exponents) / float(scaling["factor"])
    if kind == "dynamic":
        # NTK-aware: past max_position the base grows with the sequence so the slowest pair still fits. HF
        # computes the base in fp32 from the tensor length; so do we.
        if seq_len is None:
            return 1.0 / (theta**exponents)
        factor, max_position = float(scaling["factor"]), int(max_position)
        seq_len = torch.maximum(seq_len, torch.tensor(max_position, dtype=seq_len.dtype, device=seq_len.device))
        base = theta * ((factor * seq_len / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base[..., None] ** exponents)
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device)
    if kind == "longrope":
        # Phi-3: one rescale per pair, the long set once the sequence outgrows the original context.
        short, long = (1.0 / (torch.tensor(scaling[key], dtype=torch.float32, device=device) * theta**exponents)
                       for key in ("short_factor", "long_factor"))
        if seq_len is None:
            return short
        return torch.where(seq_len[..., None] > int(scaling["original_max_position_embeddings"]), long, short)
    raise ValueError(f"rope_scaling type {kind!r} is not implemented; supported: {', '.join(_TYPES)}")


def longrope_switch(scaling: dict[str, Any] | None) -> int | None:
    """LongRoPE's original context: a sequence longer than it runs with the long factors, all of it. HF's
    generate recomputes the whole cache once when a sequence grows past it (Phi-3's
    prepare_inputs_for_generation drops the cache), so a KV cache written with the short factors is stale
    there and must be recomputed (serve/engine.py). None for the other types."""
    if rope_type(scaling) == "longrope":
        return int(scaling["original_max_position_embeddings"])
    return None


def attention_factor(scaling: dict[str, Any] | None, max_position: int) -> float:
    """The factor HF multiplies cos and sin by (YaRN and LongRoPE temper attention at long range; 1 otherwise)."""
    kind = rope_type(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor")
    if factor is None:  # Phi-3 and DeepSeek state the ratio of context lengths instead of a factor
        factor = max_position / original
    if kind == "longrope":
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def softmax_scale_factor(scaling: dict[str, Any] | None) -> float:
    """What DeepSeek's attention multiplies its softmax scale by under YaRN: mscale(factor, mscale_all_dim)^2
    (transformers' yarn_apply_mscale; 1 without mscale_all_dim). Only multi-head latent attention applies it."""
    if rope_type(scaling) == "default" or not scaling.get("mscale_all_dim"):
        return 1.0
    mscale = _yarn_mscale(float(scaling["factor"]), scaling["mscale_all_dim"])
    return mscale * mscale


def _yarn_mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, base: float, scaling: dict[str, Any], device) -> torch.Tensor:
    # Pairs that rotate many times within the original context keep their frequency (extrapolation), slow ones
    # are divided by `factor` (interpolation), with a linear ramp between the two correction dimensions.
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1 - ramp.to(device=device, dtype=torch.float)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


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


class Rotary:
    """cos and signed sin for a model's positions, frequencies cached per device. The length-dependent types
    (dynamic NTK rescales the base, LongRoPE picks short or long factors) follow HF, where the frequencies of a
    forward come from its largest position + 1, so cached keys keep the rotation they were written with. We
    take that length per row, on the device (no host sync, so CUDA graphs can capture it): a sequence served
    in a batch gets the angles HF's generate gives it alone. HF differs where its own state shows: it keeps the
    largest dynamic length seen (a shorter forward after a longer one, both past max_position, reuses the
    longer one's base). A chunk of a longer prefill passes `seq_len`, the length the whole prefill reaches,
    so its angles are those of HF's one-call prefill of the prompt (a dynamic-NTK sequence recomputed after a
    preemption gets its whole length's base, where HF's cached keys kept the bases they were written with)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position: int,
                 partial_rotary_factor: float = 1.0):
        self.dim = int(head_dim * partial_rotary_factor)  # features past it pass through unrotated (Phi-3 family)
        self.theta, self.scaling, self.max_position = theta, scaling, max_position
        self.length_dependent = rope_type(scaling) in _LENGTH_DEPENDENT
        self.factor = attention_factor(scaling, max_position)
        self._cache: dict[str, torch.Tensor] = {}

    def inv_freq(self, device: torch.device, seq_len: torch.Tensor | None = None) -> torch.Tensor:
        if seq_len is not None:
            return inverse_frequencies(self.dim, self.theta, self.scaling, device, seq_len, self.max_position)
        if str(device) not in self._cache:
            self._cache[str(device)] = inverse_frequencies(self.dim, self.theta, self.scaling, device)
        return self._cache[str(device)]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype,
                 seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """seq_len: (B, 1) int64, each row's length for the length-dependent types (default: its largest
        position + 1)."""
        if not self.length_dependent:
            seq_len = None
        elif seq_len is None:
            seq_len = positions.amax(dim=-1, keepdim=True) + 1
        return rope_cos_sin(positions, self.inv_freq(positions.device, seq_len), dtype, self.factor)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin, each (batch, seq, head_dim), for integer positions of shape (batch, seq) and
    frequencies (head_dim // 2,) or, per row, (batch, 1, head_dim // 2).

    The sin's first half is negated so apply_rope can rotate with one flip instead of HF's slice + negate +
    cat: the products are the same floating-point operations (negation is exact), so results are bitwise
    HF's, while backward avoids two zero-filled slice gradients per tensor."""
    # Computed in fp32 whatever the autocast state, as HF does: bf16 angles lose whole radians at 8k.
    with torch.autocast(device_type=positions.device.type, enabled=False):
        freqs = positions[..., None].float() * inv_freq.float().to(positions.device)
        sin = freqs.sin()
        cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)
        if scale != 1.0:  # YaRN / LongRoPE attention factor, applied in fp32 as HF does
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by angles given as cos and signed sin (batch, seq, rotary_dim):
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as [x2, x1] * [-sin, sin].
    With partial rotary (rotary_dim < head_dim) only the first rotary_dim features rotate, as in HF."""
    if cos.shape[-1] < x.shape[-1]:
        rot, rest = x.split((cos.shape[-1], x.shape[-1] - cos.shape[-1]), dim=-1)
        return torch.cat((apply_rope(rot, cos, signed_sin), rest), dim=-1)
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)  # [x2, x1]
    return x * cos.unsqueeze(2) + swapped * signed_sin.unsqueeze(2)
