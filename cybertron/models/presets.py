"""Named model shapes. Data, not code: a new shape is a new entry here."""

from __future__ import annotations

import dataclasses
from typing import Any

from cybertron.models.config import ModelConfig

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The default run's model (`cybertron train` with no arguments, on 2 CPU cores): at a budget of minutes a
    # smaller model ends lower than a larger one, because it sees more tokens in the time while its loss per
    # token stays close to the larger one's (bench/RESULTS.md, "The default run").
    "nano": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                 max_seq_len=1024, tie_embeddings=False, rope_theta=10000.0),
    # The benchmarks' small shape (and the default run's model before "nano").
    "tiny": dict(vocab_size=4096, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512,
                 max_seq_len=1024, tie_embeddings=False, rope_theta=10000.0),
    # Used by tests: a few thousand parameters per layer, fast in every parallel layout.
    "debug": dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    # A small mixture of experts (Mixtral-shaped, so it exports as MixtralForCausalLM): 8 experts, 2 per token,
    # for the CPU test suite and bench/moe.py. The balancing loss is on (HF's router_aux_loss_coef scale).
    "moe": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=1024,
                tie_embeddings=False, rope_theta=10000.0, n_experts=8, top_k=2, aux_loss_coef=0.01),
    # A small DeepSeek-V3 shape (exports as DeepseekV3ForCausalLM): multi-head latent attention with a low-rank
    # query and HF's interleaved rope, a dense first layer, then 8 sigmoid-scored experts in 4 groups (2 groups
    # selectable per token), one shared expert and auxiliary-loss-free balancing through the selection bias.
    "deepseek-moe": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=256,
                         max_seq_len=1024, tie_embeddings=False, rope_theta=10000.0, kv_lora_rank=32,
                         q_lora_rank=48, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                         rope_interleave=True, n_experts=8, top_k=2, moe_ffn_dim=64, shared_ffn_dim=64,
                         first_k_dense=1, score_func="sigmoid", selection_bias=True, routed_scaling_factor=2.5,
                         n_group=4, topk_group=2, bias_update_rate=1e-3),
    "llama3-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072,
                      tie_embeddings=True),
    "llama3-3b": dict(vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                      norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072,
                      tie_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_seq_len=131072),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096),
    "mistral-7b": dict(vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768),
    "qwen2-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
                       norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True,
                       tie_embeddings=True),
    "qwen2-7b": dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                     norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True),
    "qwen3-0.6b": dict(vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       ffn_dim=3072, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, qk_norm=True,
                       tie_embeddings=True),
}


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named preset, with field overrides (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = dict(PRESETS[name])
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown model field {key!r}")
        if value is not None:
            values[key] = value
    return ModelConfig(**values)
