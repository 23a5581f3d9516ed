"""Fused projections in HF checkpoints (Phi-3: `self_attn.qkv_proj`, `mlp.gate_up_proj`) <-> our separate ones.

We split on load and fuse again on export, rather than keeping them fused: separate q/k/v and gate/up are
what tensor parallelism shards column-wise and what LoRA targets by name, so every family shares one model.
The fused rows are q, k, v (and gate, up) concatenated in that order, so the split is exact.
"""

from __future__ import annotations

import torch

from cybertron.models.config import ModelConfig


def split_fused(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our keys, with any fused qkv_proj / gate_up_proj weight split into its parts (others untouched)."""
    hd = cfg.head_size
    qkv_rows = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("self_attn.qkv_proj.weight"):
            prefix = key[: -len("qkv_proj.weight")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(qkv_rows)):
                out[f"{prefix}{name}.weight"] = part
        elif key.endswith("mlp.gate_up_proj.weight") and tensor.dim() == 2:  # not a stacked expert tensor
            prefix = key[: -len("gate_up_proj.weight")]
            gate, up = tensor.chunk(2)
            out[f"{prefix}gate_proj.weight"], out[f"{prefix}up_proj.weight"] = gate, up
        else:
            out[key] = tensor
    return out


def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_fused for an export to a fused family (bias-free projections, as Phi-3's are)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("self_attn.q_proj.weight"):
            prefix = key[: -len("q_proj.weight")]
            out[f"{prefix}qkv_proj.weight"] = torch.cat(
                [state[f"{prefix}{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")])
        elif key.endswith("mlp.gate_proj.weight"):
            prefix = key[: -len("gate_proj.weight")]
            out[f"{prefix}gate_up_proj.weight"] = torch.cat([tensor, state[f"{prefix}up_proj.weight"]])
        elif not key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            out[key] = tensor
    return out
