"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one compressed latent per token.

Per token, `kv_a_proj_with_mqa` gives a latent (kv_lora_rank, normalised by `kv_a_layernorm`) and one rope key
(qk_rope_head_dim) shared by every head; `kv_b_proj` up-projects the latent into each head's key part without
position (qk_nope_head_dim) and its value (v_head_dim). Queries come from `q_proj`, or from a low-rank pair
`q_a_proj` -> `q_a_layernorm` -> `q_b_proj` when q_lora_rank is set. Parameter names are HF's.

Two ways to attend, both exact:
- no cache (training, and any forward without a cache): up-project keys and values, then plain causal
  attention over (nope + rope)-wide keys;
- with a cache (serving): the cache stores only [latent, rope key] per token (one "head" of
  kv_lora_rank + qk_rope_head_dim) and attention runs in latent space ("absorbed"): each head's nope query is
  multiplied into the latent by its slice of kv_b_proj, the latent itself serves as the value, and the
  head's value projection is applied after attention. No per-token up-projection of the whole context per
  step, and the cache layer sees a one-head attention (serve/latent_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cybertron.models.config import ModelConfig
from cybertron.models.rope import apply_rope, softmax_scale_factor

# HF builds q_a_layernorm and kv_a_layernorm with their default eps, whatever rms_norm_eps says.
_LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """norm: the model's RMSNorm class; attention: its causal attention (q, k, v, mask) -> out, both handed in by
    models/llama.py (which imports this file), so both attentions share one kernel and one mask convention."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, norm: Callable[[int, float], nn.Module],
                 attention: Callable[..., torch.Tensor]):
        super().__init__()
        self.attention = attention
        self.layer_idx = layer_idx
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        qk = self.nope + self.rope
        # The softmax scale is 1/sqrt(qk), SDPA's default for qk-wide queries, times YaRN's mscale^2 when the
        # config has mscale_all_dim (DeepSeek-V3 checkpoints do). The latent path passes the whole scale; the
        # up-projected path keeps SDPA's default and folds the extra factor into the queries.
        self.extra_scale = softmax_scale_factor(cfg.rope_scaling)
        self.scale = qk ** -0.5 * self.extra_scale
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * qk, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = norm(cfg.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = norm(self.rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache=None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(b, t, -1, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = k_rot.view(b, t, 1, self.rope)
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot, cos, sin)
        if cache is not None:
            out = self._attend_cached(cache, q_nope, q_rot, latent, k_rot)
        else:
            kv = self.kv_b_proj(latent).view(b, t, -1, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rot.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
            q = torch.cat([q_nope, q_rot], dim=-1)
            out = self.attention(q if self.extra_scale == 1.0 else q * self.extra_scale, k, v, mask)
        return self.o_proj(out.reshape(b, t, -1))

    def _attend_cached(self, cache, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                       k_rot: torch.Tensor) -> torch.Tensor:
        attend = getattr(cache, "attend_latent", None)
        if attend is None:
            raise TypeError(f"{type(cache).__name__} stores per-head keys and values; multi-head latent attention "
                            f"needs a latent cache (serve/latent_cache.py)")
        if type(self.kv_b_proj) is not nn.Linear:  # an adapter or quantized base: its weight is not the product
            raise TypeError("attention in latent space reads kv_b_proj's weight; a wrapped kv_b_proj (adapter, "
                            "quantization) is not supported there")
        w = self.kv_b_proj.weight.view(-1, self.nope + self.v_dim, self.rank)  # (heads, nope + v, rank)
        w_k, w_v = w.split([self.nope, self.v_dim], dim=1)
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, w_k)
        query = torch.cat([q_latent, q_rot], dim=-1)  # (B, T, heads, rank + rope)
        entry = torch.cat([latent[:, :, None], k_rot], dim=-1)  # (B, T, 1, rank + rope): what is cached
        out_latent = attend(self.layer_idx, query, entry, self.rank, self.scale)  # (B, T, heads, rank)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_v)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): HF's interleaved rope pairs (x0, x1), (x2, x3)
    become the half layout apply_rope rotates, with the very same products (HF's rope_interleave output is
    laid out the same way)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
