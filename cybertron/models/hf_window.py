"""Sliding-window fields of Hugging Face configs <-> ModelConfig.sliding_window / layer_types.

Each family spells the window differently, and transformers fills in defaults for what config.json omits:
- Mistral: `sliding_window` (absent: 4096), every layer slides; Mixtral the same with no default.
- Qwen2 / Qwen3: `use_sliding_window` switches `sliding_window` on (default 4096) for the layers from
  `max_window_layers` (default 28) on, unless `layer_types` lists each layer; Qwen3-MoE slides every layer.
- Qwen2-MoE: transformers slides the even-indexed layers below `max_window_layers` (unless `layer_types`).
Llama has no window.
"""

from __future__ import annotations

from typing import Any

from cybertron.errors import UserError
from cybertron.models.config import ModelConfig

SLIDING, FULL = "sliding_attention", "full_attention"
_EVERY_LAYER = {"MistralForCausalLM": 4096, "MixtralForCausalLM": None,
                "Phi3ForCausalLM": None}  # arch -> transformers' default (h5: Phi-3 slides every layer)
# h5: Gemma 2 / 3 list each layer's type (transformers writes layer_types); defaults: Gemma 2 alternates from a
# sliding layer 0, Gemma 3 has every 6th layer full.
_TYPED = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}
_SWITCHED = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


def window_config_from_hf(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """{"sliding_window", "layer_types"} as transformers would build this config's attention."""
    n_layers = hf.get("num_hidden_layers", 0)
    if arch in _EVERY_LAYER:
        window = hf.get("sliding_window", _EVERY_LAYER[arch])
        return {"sliding_window": window or None, "layer_types": None}
    if arch in _TYPED:
        window = hf.get("sliding_window", 4096)
        period = hf.get("sliding_window_pattern", _TYPED[arch])
        types = list(hf.get("layer_types") or [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)])
        if not window or SLIDING not in types:
            return {"sliding_window": None, "layer_types": None}
        return {"sliding_window": window, "layer_types": types}
    if arch not in _SWITCHED:
        return {}
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
    if not window:
        return {"sliding_window": None, "layer_types": None}
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
    elif arch == "Qwen3MoeForCausalLM":
        types = [SLIDING] * n_layers
    elif arch == "Qwen2MoeForCausalLM":
        start = hf.get("max_window_layers", 28)
        types = [SLIDING if (i + 1) % 2 and i < start else FULL for i in range(n_layers)]
    else:
        start = hf.get("max_window_layers", 28)
        types = [SLIDING if i >= start else FULL for i in range(n_layers)]
    return {"sliding_window": window, "layer_types": types}


def window_config_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    """The HF fields that make transformers build our windows; UserError when the family cannot say it."""
    types = [SLIDING if cfg.layer_window(i) is not None else FULL for i in range(cfg.n_layers)]
    if arch in _EVERY_LAYER:
        if cfg.sliding_window is not None and FULL in types:
            raise UserError(f"cannot export model.layer_types with full-attention layers as {arch}: every "
                            "layer of that family slides")
        return {"sliding_window": cfg.sliding_window}
    if arch in _TYPED:  # h5
        return {"sliding_window": cfg.sliding_window or 4096, "layer_types": types}
    if arch in _SWITCHED:
        if cfg.sliding_window is None:
            return {"use_sliding_window": False}
        return {"use_sliding_window": True, "sliding_window": cfg.sliding_window, "layer_types": types,
                "max_window_layers": types.index(SLIDING)}
    if cfg.sliding_window is not None:
        raise UserError(f"cannot export model.sliding_window={cfg.sliding_window} as {arch}: that family has "
                        "no sliding-window attention")
    return {}
