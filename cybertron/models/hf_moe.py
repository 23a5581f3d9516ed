"""The mixture-of-experts part of Hugging Face conversion (models/hf.py): config fields and expert weights.

Our experts are stacked: `layers.{i}.mlp.experts.gate_proj` (E, ffn, dim), `up_proj` (E, ffn, dim),
`down_proj` (E, dim, ffn). HF checkpoints hold either one tensor per expert (what transformers 5 still
writes with save_pretrained: `mlp.experts.{j}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{j}.w1`)
or transformers 5's fused in-memory layout (`mlp.experts.gate_up_proj` (E, 2 ffn, dim) + `down_proj`).
Both import; export writes the per-expert layout, which every transformers version loads.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cybertron.errors import UserError
from cybertron.models.config import ModelConfig

# HF family -> how its MoE is spelled. "prefix": the block's module name; "names": gate/up/down per expert.
STYLES: dict[str, dict[str, Any]] = {
    "mixtral": {"prefix": "block_sparse_moe", "names": ("w1", "w3", "w2"), "experts_key": "num_local_experts"},
    "qwen2_moe": {"prefix": "mlp", "names": ("gate_proj", "up_proj", "down_proj"), "experts_key": "num_experts"},
    "qwen3_moe": {"prefix": "mlp", "names": ("gate_proj", "up_proj", "down_proj"),
                  "experts_key": "num_local_experts"},
    "deepseek_v3": {"prefix": "mlp", "names": ("gate_proj", "up_proj", "down_proj"),
                    "experts_key": "n_routed_experts"},
}
_OURS = ("gate_proj", "up_proj", "down_proj")

# HF routing fields that change the math, and the values we implement (rule 9: anything else is refused).
_ROUTING_DEFAULTS = {"router_jitter_noise": (0, 0.0, None), "topk_method": ("greedy", None),
                     "n_group": (1, None), "topk_group": (1, None), "scoring_func": ("softmax", None),
                     "routed_scaling_factor": (1, 1.0, None), "moe_layer_freq": (1, None),
                     "first_k_dense_replace": (0, None), "n_shared_experts": (0, None)}
# DeepSeek-V3 implements its own routing (sigmoid scores, groups, shared experts); these must still be plain.
_DEEPSEEK_ROUTING = {"router_jitter_noise": (0, 0.0, None), "topk_method": ("noaux_tc", None),
                     "scoring_func": ("sigmoid", None), "moe_layer_freq": (1, None)}


def moe_config_from_hf(hf: dict[str, Any], style: str) -> dict[str, Any]:
    """ModelConfig values for the MoE fields of an HF config of this style; UserError naming a refused field."""
    for key, allowed in (_DEEPSEEK_ROUTING if style == "deepseek_v3" else _ROUTING_DEFAULTS).items():
        if hf.get(key) not in allowed:
            raise UserError(f"unsupported {key}={hf[key]!r} in config.json: only {allowed[0]!r} is implemented")
    n_experts = hf.get("num_local_experts", hf.get("num_experts", hf.get("n_routed_experts")))
    top_k = hf.get("num_experts_per_tok")
    if not isinstance(n_experts, int) or not isinstance(top_k, int):
        raise UserError("config.json of a mixture-of-experts model needs integer num_experts and "
                        "num_experts_per_tok")
    if top_k > n_experts or top_k < 1:
        raise UserError(f"num_experts_per_tok={top_k} in config.json must be between 1 and the number of "
                        f"experts {n_experts}")
    coef = float(hf.get("router_aux_loss_coef", 0.0))
    values: dict[str, Any] = {
        "n_experts": n_experts, "top_k": top_k,
        # HF adds the balancing loss only with output_router_logits; we follow the same switch.
        "aux_loss_coef": coef if hf.get("output_router_logits") else 0.0,
    }
    if style == "mixtral":
        values["norm_topk_prob"] = True  # Mixtral always renormalises the top-k weights
        return values
    values["moe_ffn_dim"] = hf["moe_intermediate_size"]
    values["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))
    values["decoder_sparse_step"] = int(hf.get("decoder_sparse_step", 1))
    values["mlp_only_layers"] = list(hf.get("mlp_only_layers") or [])
    if style == "qwen2_moe":
        values["shared_ffn_dim"] = int(hf.get("shared_expert_intermediate_size", 0))
        values["shared_expert_gate"] = values["shared_ffn_dim"] > 0
    if style == "deepseek_v3":
        values.update(_deepseek_from_hf(hf))
    return values


def _deepseek_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers builds every layer from first_k_dense_replace on as MoE, with n_shared_experts fused into one
    # shared MLP, and the router's selection bias always present.
    return {"score_func": "sigmoid", "selection_bias": True, "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
            "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
            "shared_ffn_dim": int(hf.get("n_shared_experts") or 0) * int(hf["moe_intermediate_size"]),
            "first_k_dense": int(hf.get("first_k_dense_replace") or 0),
            "n_group": int(hf.get("n_group") or 1), "topk_group": int(hf.get("topk_group") or 1),
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def moe_config_to_hf(cfg: ModelConfig, style: str) -> dict[str, Any]:
    """HF config fields for our MoE fields; UserError naming a field this family cannot express."""
    _check_expressible(cfg, style)
    hf: dict[str, Any] = {STYLES[style]["experts_key"]: cfg.n_experts, "num_experts_per_tok": cfg.top_k,
                          "output_router_logits": cfg.aux_loss_coef > 0,
                          "router_aux_loss_coef": cfg.aux_loss_coef or cfg.extra.get("router_aux_loss_coef", 0.001)}
    if style == "qwen3_moe":
        hf["num_experts"] = cfg.n_experts  # the name before transformers 5 (an alias in 5)
    if style != "mixtral":
        hf["moe_intermediate_size"] = cfg.expert_ffn_dim
        hf["norm_topk_prob"] = cfg.norm_topk_prob
        hf["decoder_sparse_step"] = cfg.decoder_sparse_step
        hf["mlp_only_layers"] = sorted(set(cfg.mlp_only_layers) | set(range(cfg.first_k_dense)))
    if style == "qwen2_moe":
        hf["shared_expert_intermediate_size"] = cfg.shared_ffn_dim
        hf["qkv_bias"] = cfg.qkv_bias
    if style == "deepseek_v3":
        for key in ("decoder_sparse_step", "mlp_only_layers"):
            hf.pop(key)
        hf.update(n_shared_experts=cfg.shared_ffn_dim // cfg.expert_ffn_dim, first_k_dense_replace=cfg.first_k_dense,
                  routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group,
                  scoring_func="sigmoid", topk_method="noaux_tc")
    return hf


def _check_expressible(cfg: ModelConfig, style: str) -> None:
    def refuse(field: str) -> None:
        raise UserError(f"cannot export model.{field}={getattr(cfg, field)!r} as {style}: that family has no such "
                        f"setting")

    if style == "deepseek_v3":
        _check_deepseek(cfg, refuse)
        return
    for field, plain in (("score_func", "softmax"), ("n_group", 1), ("kv_lora_rank", 0)):
        if getattr(cfg, field) != plain:
            refuse(field)
    if cfg.routed_scaling_factor != 1.0:
        refuse("routed_scaling_factor")
    if cfg.shared_ffn_dim and (style != "qwen2_moe" or not cfg.shared_expert_gate):
        refuse("shared_ffn_dim")
    if style == "mixtral":
        for field, plain in (("first_k_dense", 0), ("decoder_sparse_step", 1), ("mlp_only_layers", []),
                             ("norm_topk_prob", True), ("qk_norm", False), ("qkv_bias", False)):
            if getattr(cfg, field) != plain:
                refuse(field)
        if cfg.expert_ffn_dim != cfg.ffn_dim:
            refuse("moe_ffn_dim")
    if style == "qwen3_moe" and not cfg.qk_norm:
        refuse("qk_norm")
    if style == "qwen2_moe" and cfg.qk_norm:
        refuse("qk_norm")


def _check_deepseek(cfg: ModelConfig, refuse) -> None:
    for field, plain in (("score_func", "sigmoid"), ("decoder_sparse_step", 1), ("mlp_only_layers", []),
                         ("shared_expert_gate", False)):
        if getattr(cfg, field) != plain:
            refuse(field)
    if not cfg.shared_ffn_dim or cfg.shared_ffn_dim % cfg.expert_ffn_dim:
        refuse("shared_ffn_dim")  # n_shared_experts (>= 1) x moe_intermediate_size
    if not cfg.is_mla:
        refuse("kv_lora_rank")


def guess_style(cfg: ModelConfig) -> str:
    """The HF family for a MoE model trained here (no imported architecture to keep)."""
    if cfg.is_mla:
        return "deepseek_v3"
    if cfg.shared_ffn_dim:
        return "qwen2_moe"
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


_PER_EXPERT = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_HF_NAME = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
            "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys (after the `model.` prefix went) with per-expert or fused HF expert tensors -> stacked ones.
    Mixtral's `block_sparse_moe.` becomes `mlp.`."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        if m := _PER_EXPERT.match(key):
            name = _HF_NAME.get(m.group(3))
            if name is None:
                raise UserError(f"unexpected expert weight {key!r}")
            per_expert.setdefault((m.group(1), name), {})[int(m.group(2))] = value
        elif m := _FUSED.match(key):
            prefix = f"{m.group(1)}.mlp.experts."
            if m.group(2) == "down_proj":
                out[prefix + "down_proj"] = value
            else:  # (E, 2 ffn, dim): gate rows first, then up (transformers' Concatenate(dim=1))
                gate, up = value.chunk(2, dim=1)
                out[prefix + "gate_proj"], out[prefix + "up_proj"] = gate.contiguous(), up.contiguous()
        else:  # Mixtral's block name, DeepSeek's plural shared expert
            key = key.replace(".block_sparse_moe.", ".mlp.").replace(".mlp.shared_experts.", ".mlp.shared_expert.")
            out[key] = value
    for (layer, name), experts in per_expert.items():
        if sorted(experts) != list(range(len(experts))):
            raise UserError(f"{layer}: expert weights {name} are missing for some experts")
        out[f"{layer}.mlp.experts.{name}"] = torch.stack([experts[j] for j in range(len(experts))])
    return out


_STACKED = re.compile(r"^(layers\.\d+)\.mlp\.(experts\.(gate_proj|up_proj|down_proj)|gate\.weight)$")


def unstack_experts(state: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """Our stacked expert tensors -> HF's per-expert keys for this family (still without `model.`)."""
    prefix, names = STYLES[style]["prefix"], dict(zip(_OURS, STYLES[style]["names"]))
    out: dict[str, torch.Tensor] = {}
    if style == "deepseek_v3":
        return _unstack_deepseek(state, names)
    for key, value in state.items():
        if key.endswith(".mlp.gate.e_score_correction_bias"):
            if value.abs().max() > 0:
                raise UserError(f"cannot export the routing bias {key} (model.bias_update_rate) as {style}: that "
                                f"family has no selection bias, so its routing would differ")
            continue
        m = _STACKED.match(key)
        if m is None:
            out[key] = value
        elif m.group(3) is None:  # the router
            out[f"{m.group(1)}.{prefix}.gate.weight"] = value
        else:
            for j, expert in enumerate(value.unbind(0)):
                out[f"{m.group(1)}.{prefix}.experts.{j}.{names[m.group(3)]}.weight"] = expert.clone()
    return out


def _unstack_deepseek(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 keeps the selection bias (a zero one when this model has none: HF expects it)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _STACKED.match(key)
        if m is None:
            out[key.replace(".mlp.shared_expert.", ".mlp.shared_experts.")] = value
        elif m.group(3) is None:
            out[key] = value
            bias = f"{m.group(1)}.mlp.gate.e_score_correction_bias"
            out[bias] = state.get(bias, torch.zeros(value.shape[0], dtype=torch.float32))
        else:
            for j, expert in enumerate(value.unbind(0)):
                out[f"{m.group(1)}.mlp.experts.{j}.{names[m.group(3)]}.weight"] = expert.clone()
    return out
