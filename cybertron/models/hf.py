"""Hugging Face model directory (config.json + safetensors) <-> cybertron ModelConfig and state dict.

Our parameter names equal HF's minus the `model.` prefix, and RoPE uses HF's half-rotation convention, so
conversion is a rename table: no permutation of q/k weights and no per-family code paths. A new family is
a new row in ARCHITECTURES.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.models.hf_fused import fuse, split_fused
from cybertron.models.hf_mla import mla_config_from_hf, mla_config_to_hf
from cybertron.models.hf_moe import (
    guess_style,
    moe_config_from_hf,
    moe_config_to_hf,
    stack_experts,
    unstack_experts,
)
from cybertron.models.hf_window import window_config_from_hf, window_config_to_hf
from cybertron.models.llama import Transformer
from cybertron.models.rope import rope_type

# Architecture -> fixed features of the family (fields that HF configs imply rather than state).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"model_type": "llama"},
    "MistralForCausalLM": {"model_type": "mistral"},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "qkv_bias": True},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "qk_norm": True},
    # "fused": checkpoints hold qkv_proj and gate_up_proj, split on load and fused on export (models/hf_fused.py).
    "Phi3ForCausalLM": {"model_type": "phi3", "fused": True},
    # Gemma: "gemma" turns on the ModelConfig fields of _GEMMA; "defaults" are transformers' class defaults,
    # for a config.json that leaves them out.
    "Gemma2ForCausalLM": {"model_type": "gemma2", "gemma": True, "defaults": {
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}},
    "Gemma3ForCausalLM": {"model_type": "gemma3_text", "gemma": True, "qk_norm": True, "defaults": {
        "rope_local_base_freq": 10000.0}},
    # Mixtures of experts: "moe" names the spelling of the expert block (models/hf_moe.py).
    "MixtralForCausalLM": {"model_type": "mixtral", "moe": "mixtral"},
    "Qwen2MoeForCausalLM": {"model_type": "qwen2_moe", "qkv_bias": True, "moe": "qwen2_moe"},
    "Qwen3MoeForCausalLM": {"model_type": "qwen3_moe", "qk_norm": True, "moe": "qwen3_moe"},
    # Multi-head latent attention (models/hf_mla.py) with DeepSeek routing.
    "DeepseekV3ForCausalLM": {"model_type": "deepseek_v3", "moe": "deepseek_v3", "mla": True},
}
_GEMMA = {"norm_plus_one": True, "sandwich_norms": True, "embed_scale": True}
_GEMMA_DEFAULTS = {"hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "query_pre_attn_scalar": 256, "head_dim": 256}
_MOE_ARCH = {family["moe"]: arch for arch, family in ARCHITECTURES.items() if "moe" in family}

# HF config key -> ModelConfig field, for the keys whose meaning is shared by every family above.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_dim",
    "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
    "tie_word_embeddings": "tie_embeddings",
}
# HF fields we carry through untouched so an exported config is as complete as the imported one.
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "use_sliding_window",
                "initializer_range", "hidden_act", "original_max_position_embeddings")


def hf_key_to_ours(key: str) -> str:
    return key[len("model."):] if key.startswith("model.") else key


def our_key_to_hf(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a parsed HF config.json; UserError for an architecture we do not implement."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {arch!r} in config.json; supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    if family.get("gemma"):
        hf = {**_GEMMA_DEFAULTS, **family["defaults"], **hf}
    _refuse_unimplemented(hf, family)
    values: dict[str, Any] = {ours: hf[key] for key, ours in _CONFIG_KEYS.items() if key in hf}
    values.setdefault("n_kv_heads", values.get("n_heads"))
    if hf.get("head_dim") and hf["head_dim"] != hf["hidden_size"] // hf["num_attention_heads"]:
        values["head_dim"] = hf["head_dim"]
    values.update(_rope_from_hf(hf))
    values["qkv_bias"] = bool(family.get("qkv_bias", False))
    values["qk_norm"] = bool(family.get("qk_norm", False))
    values["mlp_act"] = hf.get("hidden_activation", hf.get("hidden_act", "silu"))
    if family.get("gemma"):
        values.update(_GEMMA, attn_scalar=float(hf["query_pre_attn_scalar"]),
                      final_logit_softcap=hf.get("final_logit_softcapping"),
                      attn_softcap=hf.get("attn_logit_softcapping"))
    values["extra"] = {"architecture": arch, **{k: hf[k] for k in _PASSTHROUGH if k in hf}}
    if family.get("mla"):
        values.update(mla_config_from_hf(hf))

    values.update(window_config_from_hf(hf, arch))  # sliding windows (h4)
    if "moe" in family:
        values.update(moe_config_from_hf(hf, family["moe"]))
        if "router_aux_loss_coef" in hf:  # kept for export when the loss is off (output_router_logits false)
            values["extra"]["router_aux_loss_coef"] = hf["router_aux_loss_coef"]
    try:
        cfg = ModelConfig(**values)
        cfg.validate()
    except (TypeError, ValueError) as err:
        raise UserError(f"config.json describes an impossible model: {err}") from err
    return cfg


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta, rope_scaling and partial_rotary_factor from either spelling: transformers >= 5 nests them in
    `rope_parameters`, older files use top-level rope_theta + rope_scaling (+ original_max_position_embeddings,
    as Phi-3 states it beside a LongRoPE scaling)."""
    rope = dict(hf.get("rope_parameters") or {})
    local = {}
    if "full_attention" in rope:  # transformers 5 Gemma 3: one set per layer type
        local, rope = dict(rope.get("sliding_attention") or {}), dict(rope["full_attention"])
    elif "rope_local_base_freq" in hf:
        local = {"rope_theta": hf["rope_local_base_freq"]}
    if rope_type(local) != "default":
        raise UserError(f"unsupported rope scaling {rope_type(local)!r} on sliding-window layers in config.json")
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    scaling = dict(hf.get("rope_scaling") or (rope if rope_type(rope) != "default" else {}))
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    kind = rope_type(scaling)
    if kind in ("llama3", "yarn", "longrope"):  # as transformers standardises it: a top-level value wins (Phi-3)
        if "original_max_position_embeddings" in hf:
            scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        elif "max_position_embeddings" in hf:
            scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    scaling.pop("type", None)  # one spelling of the type, transformers' current one ("su" is LongRoPE)
    scaling = {**scaling, "rope_type": kind} if kind != "default" else {}
    values = {"rope_theta": theta, "rope_scaling": scaling or None, "partial_rotary_factor": partial}
    if local:
        values["local_rope_theta"] = float(local.get("rope_theta", 10000.0))
    return values


# HF fields that change the math and the values we implement; anything else is refused at load, naming the
# field (rule 9). Dropout (attention_dropout, resid_pdrop, embd_pdrop) is accepted: it changes nothing at
# eval, and fine-tuning here runs without it (every released checkpoint of these families sets 0.0).
_IMPLEMENTED = {"hidden_act": ("silu", "gelu_pytorch_tanh"), "hidden_activation": ("gelu_pytorch_tanh", "silu", None),
                "mlp_bias": (False, None), "pretraining_tp": (1, None),
                "use_bidirectional_attention": (False, None),
                "logits_scaling": (1, 1.0, None), "embedding_multiplier": (1, 1.0, None),
                "residual_multiplier": (1, 1.0, None), "attention_multiplier": (None,)}


def _refuse_unimplemented(hf: dict[str, Any], family: dict[str, Any]) -> None:
    for key, allowed in _IMPLEMENTED.items():
        if key in hf and hf[key] not in allowed:
            raise UserError(f"unsupported {key}={hf[key]!r} in config.json: only {allowed[0]!r} is implemented")
    # Llama's attention_bias puts a bias on o_proj too; Qwen2's fixed q/k/v bias is the family's, not this field.
    if hf.get("attention_bias") and not family.get("qkv_bias"):
        raise UserError("unsupported attention_bias=true in config.json: biases on q/k/v/o_proj are not "
                        "implemented for this architecture")


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """An HF config.json dict that `transformers.AutoModelForCausalLM` builds the same model from."""
    arch = hf_architecture(cfg)
    hf: dict[str, Any] = {"architectures": [arch], "model_type": ARCHITECTURES[arch]["model_type"]}
    hf.update({key: getattr(cfg, ours) for key, ours in _CONFIG_KEYS.items()})
    hf["head_dim"] = cfg.head_size
    hf["hidden_act"] = cfg.mlp_act
    hf["attention_bias"] = cfg.qkv_bias
    hf["rope_theta"] = cfg.rope_theta
    hf["rope_scaling"] = cfg.rope_scaling
    hf["rope_parameters"] = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    if cfg.partial_rotary_factor != 1.0:
        hf["partial_rotary_factor"] = hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    hf["torch_dtype"] = torch_dtype
    hf["dtype"] = torch_dtype
    hf.update({k: v for k, v in cfg.extra.items() if k not in ("architecture", "router_aux_loss_coef")})
    if cfg.n_experts:
        hf.update(moe_config_to_hf(cfg, ARCHITECTURES[arch]["moe"]))
    if cfg.is_mla:
        hf.update(mla_config_to_hf(cfg))
    if ARCHITECTURES[arch].get("gemma"):
        hf.update(_gemma_to_hf(cfg, arch))
    hf.update(window_config_to_hf(cfg, arch))  # sliding windows (h4), over the passed-through fields
    return hf


def _gemma_to_hf(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    wrong = {k: getattr(cfg, k) for k, v in _GEMMA.items() if getattr(cfg, k) != v}
    if wrong or cfg.qk_norm != bool(ARCHITECTURES[arch].get("qk_norm")) or cfg.qkv_bias:
        raise UserError(f"cannot export as {arch}: the family fixes {', '.join(wrong) or 'qk_norm / qkv_bias'} "
                        "differently from this model")
    scalar = cfg.attn_scalar or cfg.head_size
    hf = {"hidden_activation": cfg.mlp_act, "query_pre_attn_scalar": int(scalar) if scalar == int(scalar) else scalar,
          "final_logit_softcapping": cfg.final_logit_softcap, "attn_logit_softcapping": cfg.attn_softcap}
    if ARCHITECTURES[arch].get("qk_norm"):  # Gemma 3: RoPE per layer type
        full = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
        local = cfg.local_rope_theta or cfg.rope_theta
        hf.update(rope_local_base_freq=local, rope_parameters={
            "full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}})
    elif cfg.local_rope_theta not in (None, cfg.rope_theta):
        raise UserError(f"cannot export model.local_rope_theta={cfg.local_rope_theta} as {arch}: one RoPE base")
    return hf


def hf_architecture(cfg: ModelConfig) -> str:
    """The HF architecture an export writes: the imported one, else the family our fields describe."""
    arch = cfg.extra.get("architecture")
    if cfg.is_mla and not cfg.n_experts:
        raise UserError("cannot export multi-head latent attention without experts (model.n_experts=0): its "
                        "only Hugging Face family, DeepseekV3, is a mixture of experts")
    if arch in ARCHITECTURES and bool(cfg.n_experts) == ("moe" in ARCHITECTURES[arch]):
        return arch
    if cfg.n_experts:
        return _MOE_ARCH[guess_style(cfg)]
    if cfg.sandwich_norms:
        return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"


def read_hf_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model directory: config.json is missing")
    try:
        return config_from_hf(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    raise UserError(f"{model_dir} has no weights: expected model.safetensors or model.safetensors.index.json")


def read_hf_state_dict(model_dir: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (single or sharded safetensors), renamed to our keys."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(model_dir)):
        if not file.is_file():
            raise UserError(f"weight shard {file} listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[hf_key_to_ours(key)] = tensor.to(dtype) if dtype is not None else tensor
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot read weights from {file}: {err}") from err
    return stack_experts(state)


def load_hf_model(model_dir: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Transformer:
    """Build our Transformer from an HF directory with its weights (no random init is spent)."""
    cfg = read_hf_config(model_dir)
    state = split_fused(read_hf_state_dict(model_dir, dtype), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq") and not _beyond_layers(k, cfg)}
    if missing or unexpected:
        raise UserError(f"weights in {model_dir} do not match config.json: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    model.tie_weights()
    return model.to(device)


def _beyond_layers(key: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3 checkpoints append their multi-token-prediction modules as extra layers (model.layers.61 of
    61); transformers skips them and so do we."""
    parts = key.split(".")
    return (cfg.is_mla and len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit()
            and int(parts[1]) >= cfg.n_layers)


@dataclass(frozen=True)
class SpecialTokenIds:
    """The tokenizer's ids an exported model needs: without eos, `transformers` generates past end-of-text."""

    eos: int
    bos: int | None = None
    pad: int | None = None


def special_token_config(cfg: ModelConfig, ids: SpecialTokenIds, generation_defaults: dict[str, Any] | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json fields, generation_config.json). config.json keeps the ids an imported model had and fills
    the missing ones from the tokenizer. Generation stops at the tokenizer's eos and at every eos the base
    named (a chat template's end-of-turn token vs the base's end-of-text), as HF instruct models list both;
    `generation_defaults` (the base's generation_config.json) keeps its sampling settings."""
    had = {k: cfg.extra.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = {key: _first(had[key], ours) for key, ours in zip(had, (ids.bos, ids.eos, ids.pad))}
    defaults = {k: v for k, v in (generation_defaults or {}).items()
                if k not in ("_from_model_config", "transformers_version")}  # ours is written on purpose
    eos = []
    for e in [ids.eos, *_as_list(defaults.get("eos_token_id")), *_as_list(had["eos_token_id"])]:
        if e is not None and e not in eos:
            eos.append(e)
    generation = {**defaults, "bos_token_id": _first(ids.bos, defaults.get("bos_token_id"), had["bos_token_id"]),
                  "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "pad_token_id": _first(ids.pad, defaults.get("pad_token_id"), had["pad_token_id"])}
    return config, {k: v for k, v in generation.items() if v is not None}


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, with the file mode an ordinary open() gives (0666 less the umask, or the mode of the file
    it replaces): safetensors writes a private temporary file and renames it, which leaves mode 0600."""
    path.touch()
    mode = path.stat().st_mode & 0o7777
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)


def save_hf_model(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                  dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30,
                  special_ids: SpecialTokenIds | None = None,
                  generation_defaults: dict[str, Any] | None = None) -> Path:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) that `transformers`
    loads. `state_dict` uses our keys and holds full (unsharded) tensors. With the tokenizer's special ids,
    config.json names bos/eos/pad and generation_config.json makes `generate` stop at end-of-text."""
    out = Path(out_dir)
    if cfg.n_experts:  # checked before anything is written: an export it refuses leaves no directory
        hf_config = config_to_hf(cfg)
        state_dict = unstack_experts(state_dict, ARCHITECTURES[hf_config["architectures"][0]]["moe"])
    if ARCHITECTURES[hf_architecture(cfg)].get("fused"):
        if cfg.qkv_bias:
            raise UserError(f"cannot export to {hf_architecture(cfg)}: its fused projections have no q/k/v bias")
        state_dict = fuse(state_dict)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue  # HF stores a tied head once, as the embedding
        value = value.detach().to("cpu")
        tensors[our_key_to_hf(key)] = (value.to(dtype) if dtype is not None else value).contiguous()
    saved_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    shards = _split_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, out / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config_to_hf(cfg, saved_dtype)
    if special_ids is not None:
        token_config, generation = special_token_config(cfg, special_ids, generation_defaults)
        hf.update(token_config)
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out


def _split_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards
