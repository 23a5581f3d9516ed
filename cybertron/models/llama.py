"""Llama-family decoder: RMSNorm, RoPE (HF convention), grouped-query attention, gated MLP (SwiGLU; GeGLU and
Gemma's norms, scales and soft-capping switched on by config fields).

One plain single-device module. Parallelism is applied to it from outside (cybertron/parallel), so:
- attention infers local head counts from tensor shapes (`view(b, t, -1, head_dim)`), which is what lets
  tensor parallelism shard q/k/v column-wise without this file knowing;
- blocks live in a ModuleDict keyed by their index, so a pipeline stage that keeps layers 4..7 still calls
  them `layers.4` .. `layers.7` and checkpoints stay layout-independent;
- embedding, final norm and output head are optional, so a pipeline stage can drop them.
Parameter names follow Hugging Face (`self_attn.q_proj`, `mlp.gate_proj`, ...); see models/hf.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.models.masks import AttentionMask, dense_attention_mask, masked_attention
from cybertron.models.mla import LatentAttention
from cybertron.models.moe import GroupedExperts, MoE, Router
from cybertron.models.norms import RMSNorm, rms_norm
from cybertron.models.rope import Rotary, apply_rope
from cybertron.models.softcap import check_cache, softcapped_attention


class KVCache(Protocol):
    """What attention needs from a KV cache. The cache owns storage *and* the attention over it (a paged
    cache runs paged attention), so the model code is the same for training, generation and serving."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (batch, seq, kv_heads, head_dim) for this layer and return attention output
        (batch, seq, heads, head_dim) of q over everything cached for these sequences, causally (and, for a
        model with sliding layers, within each layer's window: such a cache has `layer_windows`, a list
        equal to the config's, and the model refuses a cache without it)."""
        ...


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_size
        hd = self.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.q_norm = rms_norm(hd, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        self.k_norm = rms_norm(hd, cfg.norm_eps, cfg.norm_plus_one) if cfg.qk_norm else None
        # Scores scaled by attn_scalar ** -0.5 rather than head_dim ** -0.5 (Gemma's query_pre_attn_scalar):
        # folded into q, so every attention path (SDPA, the paged cache, tensor parallel) stays as it is.
        scalar = cfg.attn_scalar or hd
        self.q_scale = (hd / scalar) ** 0.5 if scalar != hd else None
        self.softcap = cfg.attn_softcap  # Gemma 2: scores soft-capped (models/softcap.py)
        # The seam for parallelisms that change attention itself (context parallelism): a callable
        # (q, k, v, mask) -> out that parallel/ may replace from outside; this file stays single-device.
        self.attention: Callable[..., torch.Tensor] = causal_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # Local head counts come from the shapes: under tensor parallelism each rank holds a slice.
        q = self.q_proj(x).view(b, t, -1, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(b, t, -1, self.head_dim)  # (B, T, nkv, hd)
        v = self.v_proj(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale is not None:
            q = q * self.q_scale
        if cache is not None:
            out = cache.attend(self.layer_idx, q, k, v)
        elif self.softcap is not None:
            out = softcapped_attention(q, k, v, mask, self.softcap)
        else:
            out = self.attention(q, k, v, mask)
        return self.o_proj(out.reshape(b, t, -1))


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA over (B, T, heads, hd) tensors. `mask`: an AttentionMask (packed documents and/or a sliding
    window, no dense tensor), or a (B, 1, T, T) bool tensor that replaces the plain causal mask."""
    if isinstance(mask, AttentionMask):
        return masked_attention(q, k, v, mask)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


# Gated MLP activations by HF's name: SwiGLU (silu) or Gemma's GeGLU (gelu_pytorch_tanh).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = ACTIVATIONS[cfg.mlp_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        norm = (cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
        self.input_layernorm = rms_norm(*norm)
        if cfg.is_mla:  # multi-head latent attention (DeepSeek)
            self.self_attn = LatentAttention(cfg, layer_idx, RMSNorm, causal_attention)
        else:
            self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = rms_norm(*norm)
        # A mixture of experts or a dense MLP, per layer, as the config says (the same name either way, as HF).
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)
        # Sandwich norms (Gemma 2/3): post_attention_layernorm then normalises the attention *output*, and two
        # more norms wrap the MLP. HF's names, so checkpoints convert by the rename table.
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(*norm)
            self.post_feedforward_layernorm = rms_norm(*norm)

    def forward(self, x, cos, sin, mask: AttentionMask | torch.Tensor | None = None, cache=None):
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """`model(tokens, positions=None, cache=None)` -> logits (B, T, vocab), or hidden states for a
    pipeline stage without an output head. A stage without an embedding takes hidden states (B, T, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = rms_norm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so. Call again after anything that
        re-creates parameters (`to_empty`, `load_state_dict(assign=True)`), which silently unties them."""
        if self.config.tie_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        head: Callable[[torch.Tensor, nn.Linear], torch.Tensor] | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """head: when given, returns head(hidden_states, lm_head) in place of the logits (a fused output head
        and loss); it runs inside this forward, where FSDP has gathered the head's weight.

        logits_at: (B,) one position per row whose logits alone are returned, (B, vocab) (a prompt's last
        token at prefill: a long prompt's full logits over a large vocabulary would be mostly thrown away).
        Taken here, inside forward, so the call goes through the module's hooks (FSDP gathers the embedding
        and head in its pre-forward hook)."""
        h = self.hidden_states(tokens, positions, cache)
        if logits_at is not None:
            h = h.gather(1, logits_at[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
        if self.lm_head is None:
            return h
        cap = self.config.final_logit_softcap
        if head is not None:
            if cap is not None:
                raise ConfigError(f"model.final_logit_softcap={cap} is not applied by the fused output head and "
                                  "loss; set train.fused_loss=false")
            return head(h, self.lm_head)
        logits = self.lm_head(h)
        return logits if cap is None else torch.tanh(logits / cap) * cap  # Gemma 2: logits kept within +-cap

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """The final-norm output (B, T, dim), before the output head: what a fused head + loss consumes."""
        if cache is not None:
            check_cache(self.config, cache)  # a soft-capped model needs a cache that caps its scores
        if cache is not None and self.config.sliding_window is not None:
            self._check_cache_windows(cache)
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        if self.config.embed_scale and self.embed_tokens is not None:
            # Gemma: sqrt(dim) rounded to h's dtype as HF does, as a Python number (h may be a DTensor under TP)
            h = h * float(torch.tensor(self.config.dim**0.5, dtype=h.dtype))
        b, t = h.shape[:2]
        packed = positions is not None and cache is None
        if positions is None:  # one row of angles, broadcast over the batch
            positions = torch.arange(t, device=h.device)[None]
        else:
            positions = positions.expand(b, t) if positions.dim() == 1 else positions
        # A cache may name each row's sequence length for length-dependent RoPE (a prefill chunk: the prompt's).
        angles = self._rotary()(positions, h.dtype, getattr(cache, "rope_lengths", None))
        # Gemma 3: sliding layers rotate with their own base (local_rope_theta), unscaled.
        local = self._rotary(local=True)(positions, h.dtype) if self.config.local_rope_theta else angles
        masks: dict[tuple, AttentionMask | torch.Tensor | None] = {}  # by (window, dense), shared by layers
        for name, block in self.layers.items():
            layer_window = self.config.layer_window(int(name))
            cos, sin = local if layer_window is not None else angles
            # A cache owns its attention (and the windows: serve/cache.py).
            window = layer_window if cache is None else None
            # Under torch.compile (the whole forward, or this block: Module.compile sets _compiled_call_impl)
            # a dense mask: document boundaries are host-side ints, which dynamo would specialise on (a
            # recompilation for every new packing).
            dense = torch.compiler.is_compiling() or getattr(block, "_compiled_call_impl", None) is not None
            if (window, dense) not in masks:
                masks[window, dense] = _row_mask(positions if packed else None, window, t, h.device, dense)
            h = block(h, cos, sin, masks[window, dense], cache)
        if self.norm is not None:
            h = self.norm(h)
        return h

    def _check_cache_windows(self, cache: KVCache) -> None:
        cfg = self.config
        windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        if any(w is not None for w in windows) and getattr(cache, "layer_windows", None) != windows:
            raise ConfigError(f"model.sliding_window={cfg.sliding_window} needs a KV cache that masks keys "
                              f"outside the window; {type(cache).__name__} was not set up for it")

    def _rotary(self, local: bool = False) -> Rotary:
        # A plain attribute, not buffers: buffers would be lost by meta-device construction + to_empty and would
        # travel into checkpoints, and the frequencies are a pure function of config (cached per device inside).
        name = "_local_rotary_cache" if local else "_rotary_cache"
        rotary = self.__dict__.get(name)
        if rotary is None:
            cfg = self.config
            theta, scaling = (cfg.local_rope_theta, None) if local else (cfg.rope_theta, cfg.rope_scaling)
            rotary = Rotary(cfg.rope_dim, theta, scaling, cfg.max_seq_len, cfg.partial_rotary_factor)
            self.__dict__[name] = rotary
        return rotary

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by 1/sqrt(2 * n_layers)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = residual_std if name.endswith(("o_proj", "down_proj")) else std
                _normal_(module.weight, s, gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, std, gen)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, Router):
                _normal_(module.weight, std, gen)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                _normal_(module.gate_proj, std, gen)
                _normal_(module.up_proj, std, gen)
                _normal_(module.down_proj, residual_std, gen)


def _normal_(weight: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    # Draw on CPU with an explicit generator so every device and layout gets the very same weights.
    values = torch.empty(weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
    weight.copy_(values.to(device=weight.device, dtype=weight.dtype))


def _row_mask(positions: torch.Tensor | None, window: int | None, t: int, device: torch.device,
              dense: bool) -> AttentionMask | torch.Tensor | None:
    """The attention pattern of one forward: packed documents (positions given) and/or a window; None is
    SDPA's plain causal kernel."""
    if dense:
        if positions is None and window is None:
            return None
        return dense_attention_mask(positions, window, t, device)
    if positions is None:
        return AttentionMask(window=window) if window is not None else None
    return AttentionMask.from_positions(positions, window)


def document_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, and no attention across documents packed into one row (the model's former
    dense mask; a compiled forward still uses it, see _row_mask)."""
    return dense_attention_mask(positions, None, positions.shape[1], positions.device)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0) -> Transformer:
    """Build on `device` and initialise deterministically (meta device: shapes only, no init)."""
    with torch.device(device):
        model = Transformer(cfg)
    if str(device) != "meta":
        model.init_weights(seed)
    return model
