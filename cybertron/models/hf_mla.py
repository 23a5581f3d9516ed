"""The multi-head latent attention part of Hugging Face conversion (models/hf.py): DeepSeek-V3's config fields.

The weights need no conversion (our names are HF's, models/mla.py); HF's interleaved rope layout is kept as
is and handled at run time (model.rope_interleave)."""

from __future__ import annotations

from typing import Any

from cybertron.errors import UserError
from cybertron.models.config import ModelConfig

_FIELDS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def mla_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig values for the attention fields of a DeepSeek-V3 config.json; UserError naming a field
    whose setting we do not implement."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "yarn"):
        raise UserError(f"unsupported rope_scaling {rope.get('rope_type', rope.get('type'))!r} in config.json: "
                        f"multi-head latent attention runs plain RoPE or YaRN")
    if hf.get("attention_bias"):
        raise UserError("unsupported attention_bias=true in config.json for multi-head latent attention")
    missing = [k for k in _FIELDS if k not in hf and k != "q_lora_rank"]
    if missing:
        raise UserError(f"config.json of a latent-attention model lacks {', '.join(missing)}")
    values: dict[str, Any] = {k: hf.get(k) for k in _FIELDS}
    values["rope_interleave"] = bool(hf.get("rope_interleave", True))
    values["head_dim"] = None  # HF sets head_dim to qk_rope_head_dim; our MLA does not use it
    return values


def mla_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {k: getattr(cfg, k) for k in _FIELDS}
    hf.update(rope_interleave=cfg.rope_interleave, head_dim=cfg.qk_rope_head_dim, attention_bias=False,
              num_key_value_heads=cfg.n_heads)
    return hf
