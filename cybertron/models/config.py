"""The shape of a Llama-family decoder. Behaviour is keyed on these fields, never on model names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int | None = None  # None: dim // n_heads (Qwen3 sets it explicitly)
    ffn_dim: int = 768
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3 style frequency scaling, e.g. {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
    # "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_embeddings: bool = False
    init_std: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough HF fields we keep for export

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def validate(self) -> None:
        """Raise ValueError naming the field when the shape cannot build a model."""
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} must be even for rotary embeddings")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shape alone (matches sum(p.numel()) of the built model)."""
        hd, d = self.head_size, self.dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        total = self.n_layers * per_layer + d
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += self.vocab_size * d  # the output head does compute work
        return total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
