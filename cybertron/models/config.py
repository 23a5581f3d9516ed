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
    rope_scaling: dict[str, Any] | None = None  # also linear, dynamic (NTK), yarn, longrope: see models/rope.py
    partial_rotary_factor: float = 1.0  # the leading fraction of each head that rotates (Phi-3 family)
    max_seq_len: int = 2048
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_embeddings: bool = False
    # Gemma 2/3 (each keyed on its own field, never on the family's name):
    mlp_act: str = "silu"  # the gated MLP's activation, HF's name: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight), weights stored around 0
    sandwich_norms: bool = False  # norms after attention and after the MLP as well (4 per block)
    embed_scale: bool = False  # embeddings multiplied by sqrt(dim)
    attn_scalar: float | None = None  # scores scaled by attn_scalar ** -0.5 (query_pre_attn_scalar); None: head size
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap) (Gemma 2)
    local_rope_theta: float | None = None  # sliding-window layers rotate with this base, unscaled (Gemma 3)
    init_std: float = 0.02
    # Mixture of experts (models/moe.py); n_experts = 0 is a dense model. Which layers are MoE follows the HF
    # families: none of the first `first_k_dense` (DeepSeek), none in `mlp_only_layers`, and then every
    # `decoder_sparse_step`-th layer (Qwen2/3-MoE: layer i is MoE when (i + 1) % step == 0).
    n_experts: int = 0
    top_k: int = 2
    moe_ffn_dim: int | None = None  # each routed expert's hidden size; None: ffn_dim
    score_func: str = "softmax"  # router scores: "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the k selected scores to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the combine weights (DeepSeek)
    shared_ffn_dim: int = 0  # a dense shared expert every token passes (DeepSeek: n_shared x moe_ffn_dim)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared expert's output scaled by sigmoid(linear(x))
    aux_loss_coef: float = 0.0  # Switch/Mixtral load-balancing loss weight (HF router_aux_loss_coef)
    bias_update_rate: float = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free balancing via a selection bias
    first_k_dense: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # DeepSeek-V3 routing: the router always holds `e_score_correction_bias` (checkpoints carry one, even when
    # bias_update_rate is 0), and group-limited routing picks experts only among the `topk_group` best of
    # `n_group` equal groups of experts.
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    # Multi-head latent attention (DeepSeek-V2/V3, models/mla.py) when kv_lora_rank > 0: keys and values are
    # up-projected from one compressed latent per token (the serving cache stores that latent); head_dim and
    # n_kv_heads are then unused. q_lora_rank None: a plain q_proj; else q_a_proj -> norm -> q_b_proj.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # HF's DeepSeek rotates (even, odd) pairs of the rope dims

    # Sliding-window attention (models/masks.py): a sliding layer's query sees only the last `sliding_window`
    # keys, itself included. layer_types names each layer "full_attention" or "sliding_attention" (HF's
    # spelling, for alternating local/global layers); None with a window set: every layer slides (Mistral).
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough HF fields we keep for export

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def expert_ffn_dim(self) -> int:
        return self.moe_ffn_dim if self.moe_ffn_dim is not None else self.ffn_dim

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: the decoupled rope key's under MLA, else the whole head."""
        return self.qk_rope_head_dim if self.is_mla else self.head_size

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_experts > 0 and layer_idx >= self.first_k_dense and layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    def layer_window(self, layer_idx: int) -> int | None:
        """The attention window of this layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def validate(self) -> None:
        """Raise ValueError naming the field when the shape cannot build a model."""
        if self.is_mla:
            self._validate_mla()
        elif self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.rope_dim % 2:
            raise ValueError(f"rotary dimensions {self.rope_dim} per head must be even")
        rotary_dim = int(self.rope_dim * self.partial_rotary_factor)
        if not 0 < self.partial_rotary_factor <= 1 or rotary_dim % 2:
            raise ValueError(f"model.partial_rotary_factor={self.partial_rotary_factor} must give an even rotary "
                             f"dimension between 2 and the rotary size {self.rope_dim}")
        from cybertron.models.rope import check_scaling  # late: rope.py imports torch, this module does not

        check_scaling(self.rope_scaling, rotary_dim)
        if self.mlp_act not in ("silu", "gelu_pytorch_tanh") or (self.n_experts and self.mlp_act != "silu"):
            raise ValueError(f"model.mlp_act={self.mlp_act!r} is not implemented; use 'silu' or "
                             "'gelu_pytorch_tanh' (experts: 'silu')")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"model.sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"model.layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"model.layer_types: unknown {sorted(unknown)}; use full_attention or "
                                 "sliding_attention")
        if self.n_experts:
            self._validate_moe()

    def _validate_moe(self) -> None:
        if self.n_experts < 0:
            raise ValueError(f"model.n_experts must be >= 0, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"model.top_k={self.top_k} must be between 1 and model.n_experts={self.n_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"model.score_func={self.score_func!r} is not implemented; use 'softmax' or 'sigmoid'")
        if self.expert_ffn_dim <= 0 or self.decoder_sparse_step <= 0:
            raise ValueError("model.moe_ffn_dim and model.decoder_sparse_step must be positive")
        if self.aux_loss_coef < 0 or self.bias_update_rate < 0:
            raise ValueError("model.aux_loss_coef and model.bias_update_rate must be >= 0")
        if self.shared_expert_gate and not self.shared_ffn_dim:
            raise ValueError("model.shared_expert_gate needs a shared expert (model.shared_ffn_dim > 0)")
        per_group = self.n_experts // max(self.n_group, 1)
        if self.n_group < 1 or self.n_experts % self.n_group or (self.n_group > 1 and per_group < 2):
            raise ValueError(f"model.n_group={self.n_group} must split model.n_experts={self.n_experts} into "
                             f"equal groups of at least 2 experts")
        if not 1 <= self.topk_group <= self.n_group or self.top_k > self.topk_group * self.n_experts // self.n_group:
            raise ValueError(f"model.topk_group={self.topk_group} must be between 1 and model.n_group and keep "
                             f"at least model.top_k={self.top_k} experts selectable")

    def _validate_mla(self) -> None:
        for name in ("qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive with multi-head latent attention")
        if self.qk_nope_head_dim < 0 or (self.q_lora_rank is not None and self.q_lora_rank <= 0):
            raise ValueError("model.qk_nope_head_dim must be >= 0 and model.q_lora_rank positive or None")
        from cybertron.models.rope import rope_type  # late: rope.py imports torch, this module does not

        if rope_type(self.rope_scaling) not in ("default", "yarn"):
            raise ValueError(f"model.rope_scaling of type {rope_type(self.rope_scaling)!r} is not implemented "
                             "for multi-head latent attention (YaRN is)")
        if self.qkv_bias or self.qk_norm:
            raise ValueError("model.qkv_bias and model.qk_norm do not apply to multi-head latent attention")

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count from the shape alone (matches sum(p.numel()) of the built model). active: only the
        weights one token multiplies (top_k of the routed experts), what FLOPs per token count."""
        hd, d = self.head_size, self.dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        if self.is_mla:
            attn = self._mla_params()
        dense_mlp = 3 * d * self.ffn_dim
        moe = (self.top_k if active else self.n_experts) * 3 * d * self.expert_ffn_dim + self.n_experts * d
        moe += 3 * d * self.shared_ffn_dim
        moe += d if self.shared_expert_gate else 0
        n_moe = sum(self.is_moe_layer(i) for i in range(self.n_layers))
        norms = (4 if self.sandwich_norms else 2) * d
        total = self.n_layers * (attn + norms) + n_moe * moe + (self.n_layers - n_moe) * dense_mlp + d
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += self.vocab_size * d  # the output head does compute work
        return total

    def _mla_params(self) -> int:
        d, nh, rank = self.dim, self.n_heads, self.kv_lora_rank
        q_out = nh * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        q = d * q_out if self.q_lora_rank is None else self.q_lora_rank * (d + 1 + q_out)
        kv = d * (rank + self.qk_rope_head_dim) + rank + rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + nh * self.v_head_dim * d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
