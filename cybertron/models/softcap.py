"""Attention with soft-capped scores (Gemma 2's attn_logit_softcapping): scores -> cap * tanh(scores / cap).

No fused kernel takes a cap (SDPA has no score hook; FlexAttention has no CPU backward), so this is HF's eager
attention: explicit scores under the dense mask, fp32 softmax. Memory is quadratic in the sequence, as it is
in transformers for this model. The paged serving cache caps its scores too (serve/paged_attention.py reads
long contexts chunk by chunk with an online softmax over capped scores); a cache says so with `attn_softcap`.
"""

from __future__ import annotations

import torch

from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.models.masks import AttentionMask


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: AttentionMask | torch.Tensor | None, cap: float) -> torch.Tensor:
    """(B, T, heads, hd) q (already carrying any extra scale) over k, v (B, T, kv_heads, hd) -> (B, T, heads, hd)."""
    b, t = q.shape[:2]
    allowed = mask if isinstance(mask, torch.Tensor) else (mask or AttentionMask()).dense(t, b, q.device)
    return capped_attention(q, k, v, allowed, cap)


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                     cap: float) -> torch.Tensor:
    """q (B, T, heads, hd) over k, v (B, S, kv_heads, hd) with capped scores; allowed: a bool mask broadcastable
    to (B, heads, T, S), or None when every key is visible (a decode over its own context)."""
    heads, hd = q.shape[2], q.shape[3]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if k.shape[1] != heads:  # grouped-query: each kv head serves heads // kv_heads query heads
        k, v = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * hd**-0.5
    scores = torch.tanh(scores / cap) * cap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2)


def check_cache(cfg: ModelConfig, cache: object) -> None:
    """ConfigError naming the field when a KV cache does not cap its scores as the model asks (a cache built
    by serve/engine.build_cache does)."""
    if cfg.attn_softcap is not None and getattr(cache, "attn_softcap", None) != cfg.attn_softcap:
        raise ConfigError(f"model.attn_softcap={cfg.attn_softcap} (Gemma 2 attn_logit_softcapping) needs a KV "
                          f"cache that caps attention scores; {type(cache).__name__} was not set up for it")
