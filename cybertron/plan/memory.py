"""Peak memory of one rank of a training step, predicted from the model's shape and the layout alone.

The terms follow what cybertron actually keeps, not a generic formula (validated on CPU against the peak RSS
measured per rank by bench/plan_vs_memory.py; table in bench/RESULTS.md):

- params: the rank's parameters in fp32 (cybertron trains fp32 master weights; bf16 is autocast or FSDP2's
  mixed-precision gather). Tensor parallelism splits attention, dense-MLP, embedding and head weights over tp
  (norms stay whole; a mixture-of-experts layer is replicated over tp and its routed experts split over ep);
  pipeline parallelism keeps the largest stage's layers (the first stage also holds the embedding, the last
  the final norm and head); FSDP2 (zero3, HSDP, zero2 composed with tp/pp/ep) shards them over dp_shard x cp.
- grads: fp32 gradients kept through the step: DDP and ZeRO-1 hold a full copy (DDP's buckets, which the
  gradients are views of); the paper's ZeRO-2 (pure data parallelism) and FSDP2 1/N of them.
- optim: AdamW's exp_avg and exp_avg_sq (8 bytes per parameter) for the rank's partition: whole under DDP,
  1/N under ZeRO-1/2/3 (ZeRO-1/2 partition whole tensors, so a rank may hold a little more than 1/N).
- activations: what autograd saves for backward, per token of the rank's micro-batch (micro_batch x
  seq_len / cp tokens), per layer of the stage, in activation bytes (4 at fp32, 2 under bf16):
  the residual stream twice (each norm's input: sequence-sharded, so / tp, under tensor parallelism with
  sequence parallelism), each norm's output (the input the q/k/v and gate/up Linears save, gathered whole
  under sequence parallelism), four head-sized tensors (q after RoPE, the attention output, its reshaped
  copy for o_proj, one more copy), k and v, four FFN-sized tensors (gate, its activation, up, their
  product) and SDPA's fp32 log-sum-exp per head (all / tp). Under context parallelism (ring attention) a
  rank saves the same terms for its own seq_len / cp tokens only. The model's end adds the final norm's input
  and output and the fp32 log-softmax of the logits (vocab per token, / tp with loss parallelism). With full
  activation checkpointing a layer keeps only its input (the residual stream). Under 1F1B stage s holds
  min(pp_microbatches, pp - s) micro-batches in flight; the estimate is the largest stage's.
- transient: what exists only for part of the step: the larger of (a) the loss's backward, LOSS_COPIES fp32
  logits-sized gradients (vocab x 4 bytes per token, / tp with loss parallelism; DTensor's vocabulary-parallel
  cross-entropy holds TP_LOSS_COPIES more) and (b) with full checkpointing, the recomputed layer and its
  backward's gradient temporaries (RECOMPUTE x one layer's saved activations); plus, under FSDP2, the
  gathered weights of the blocks in flight (zero3: two blocks, current and prefetched; zero2 composed with
  tp/pp/ep/cp: the stage's weights stay gathered from forward to backward) and one block's unsharded
  gradient before its reduce-scatter; the paper's ZeRO-2 buckets its full gradients before reducing them;
  under context parallelism the ring's visiting K/V and dK/dV and its fp32 output accumulator (one layer).
- overhead: a fixed per-process term: on a GPU the CUDA context, NCCL's buffers and allocator fragmentation
  (GPU_OVERHEAD, a rough allowance: the GPU side is not validated here); on CPU the allocator's, BLAS's and
  gloo's buffers made during the first step (bench/plan_vs_memory.py's CPU_OVERHEAD).

The three constants RECOMPUTE, LOSS_COPIES and TP_LOSS_COPIES (and the CPU overhead) were fitted once over the
14 layouts of bench/plan_vs_memory.py (fp32, 2-4 gloo ranks); every other term is counted from the shapes.
Not validated: bf16 (activations at 2 bytes, fp32 residual pieces ignored), selective checkpointing (about
half a layer's activations kept), mixture-of-experts layers (top_k experts' FFN activations per token),
LoRA (frozen base only), and GPU-side allocator behaviour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from cybertron.models.config import ModelConfig
from cybertron.plan.layouts import Layout

ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZER_BYTES = {"adamw": 8}  # optimizer state per trained parameter (fp32); cybertron trains with AdamW
# Calibrated on CPU against bench/plan_vs_memory.py (bench/RESULTS.md): a recomputed layer's backward holds
# its activations and gradient temporaries of about RECOMPUTE x the layer's saved activations; the loss's
# backward holds LOSS_COPIES fp32 logits-sized gradients beside the saved log-softmax.
RECOMPUTE = 1.25
LOSS_COPIES = 1.0
TP_LOSS_COPIES = 4.0  # more under loss parallelism: DTensor's vocabulary-parallel cross-entropy backward
GPU_OVERHEAD = 1 << 30  # CUDA context, NCCL buffers, allocator fragmentation: a rough, documented allowance


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optim: float
    activations: float
    transient: float
    overhead: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.activations + self.transient + self.overhead

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Shapes:
    """Parameter counts of the model's parts, before any sharding."""

    embed: int  # the input embedding
    head: int  # the output head (0 when tied: the embedding is the head)
    attn: int  # one layer's attention weights (split over tp)
    dense_mlp: int  # one dense layer's MLP (split over tp)
    moe_mlp_routed: int  # one MoE layer's routed experts (split over ep, replicated over tp)
    moe_mlp_other: int  # one MoE layer's router and shared expert (replicated over tp and ep)
    norms: int  # one layer's norm weights (whole)

    @classmethod
    def of(cls, cfg: ModelConfig) -> Shapes:
        d = cfg.dim
        norms = (4 if cfg.sandwich_norms else 2) * d
        one = replace(cfg, n_layers=1, n_experts=0, sandwich_norms=False, first_k_dense=0, mlp_only_layers=[],
                      layer_types=None)
        embeddings = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
        attn = one.num_params() - embeddings - d - 2 * d - 3 * d * cfg.ffn_dim  # minus final norm, norms, MLP
        routed = cfg.n_experts * 3 * d * cfg.expert_ffn_dim
        other = cfg.n_experts * d + 3 * d * cfg.shared_ffn_dim + (d if cfg.shared_expert_gate else 0)
        return cls(cfg.vocab_size * d, 0 if cfg.tie_embeddings else cfg.vocab_size * d, attn, 3 * d * cfg.ffn_dim,
                   routed, other, norms)


def stage_layers(n_layers: int, n_stages: int) -> list[list[int]]:
    """parallel/pipeline.split_layers: contiguous, earlier stages take the remainder."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(list(range(start, start + size)))
        start += size
    return out


def _layer_params(cfg: ModelConfig, s: Shapes, i: int, tp: int, ep: int) -> float:
    if cfg.is_moe_layer(i):
        return s.attn / tp + s.norms + s.moe_mlp_routed / ep + s.moe_mlp_other
    return (s.attn + s.dense_mlp) / tp + s.norms


def _stage_params(cfg: ModelConfig, s: Shapes, layers: list[int], first: bool, last: bool, tp: int, ep: int
                  ) -> float:
    n = sum(_layer_params(cfg, s, i, tp, ep) for i in layers)
    if first:
        n += s.embed / tp
    if last:
        n += s.head / tp + cfg.dim + (s.embed / tp if cfg.tie_embeddings and not first else 0)
    return n


def layer_activation_bytes(cfg: ModelConfig, tp: int, act: int, cp: int = 1, moe: bool = False) -> float:
    """Bytes autograd saves per token for one layer (see the module docstring), sequence parallelism on."""
    q, kv = cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size
    ffn = cfg.ffn_dim
    if moe:  # a MoE layer runs top_k experts per token (plus the shared one), replicated over tp
        ffn_tokens = 4 * (cfg.top_k * cfg.expert_ffn_dim + cfg.shared_ffn_dim) + 3 * cfg.dim
        mlp = ffn_tokens * act
    else:
        mlp = 4 * ffn * act / tp
    # under context parallelism (ring attention) a rank saves its own tokens' q, k, v, out and lse: the same
    # terms per local token
    return (2 * cfg.dim / tp + 2 * cfg.dim + (4 * q + 2 * kv) / tp) * act + mlp + 4 * cfg.n_heads / tp


def estimate(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str = "bf16", optimizer: str = "adamw",
             method: str = "full", overhead: float = GPU_OVERHEAD) -> MemoryEstimate:
    """The peak bytes of the largest rank of `layout` for one training step at `seq_len` tokens per sequence
    (under pp: the largest of the stages). method: full (pre-training or full fine-tuning) or lora (frozen
    base; the adapters' gradients and optimizer state are negligible beside it)."""
    stages = stage_layers(cfg.n_layers, layout.dims.pp)
    return max((_stage_estimate(cfg, layout, seq_len, dtype, optimizer, method, overhead, stages, i)
                for i in range(len(stages))), key=lambda e: e.total)


def _stage_estimate(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str, optimizer: str, method: str,
                    overhead: float, stages: list[list[int]], stage: int) -> MemoryEstimate:
    d = layout.dims
    s = Shapes.of(cfg)
    act = ACT_BYTES[dtype]
    layers = stages[stage]
    first, last = stage == 0, stage == d.pp - 1
    n = _stage_params(cfg, s, layers, first, last, d.tp, d.ep)
    block = max(_layer_params(cfg, s, i, d.tp, d.ep) for i in layers) if layers else 0

    fsdp = _fsdp(layout)
    shard = d.dp_shard * d.cp if fsdp else 1
    zero_n = d.dp * d.cp
    trained = 1.0 if method == "full" else 0.0
    params = 4 * n / shard
    if fsdp:
        grads = 4 * n * trained / shard
        optim = OPTIMIZER_BYTES[optimizer] * n * trained / shard
    else:
        grads = 4 * n * trained / (zero_n if _paper_zero2(layout) else 1)
        optim_div = zero_n if d.data_parallel in ("zero1", "zero2") and zero_n > 1 else 1
        optim = OPTIMIZER_BYTES[optimizer] * n * trained / optim_div

    tokens = layout.micro_batch * seq_len / d.cp
    # 1F1B: stage s runs pp - s forwards before its first backward (GPipe would hold all m)
    in_flight = min(layout.pp_microbatches, d.pp - stage) if d.pp > 1 else 1
    saved = [layer_activation_bytes(cfg, d.tp, act, d.cp, cfg.is_moe_layer(i)) * tokens for i in layers]
    per_layer = max(saved, default=0.0)
    stream = cfg.dim * act / d.tp * tokens  # a block's input, all that full checkpointing keeps
    lp = d.tp  # loss parallelism (cybertron's default with tp > 1) keeps the logits vocabulary-sharded
    head = (cfg.dim / d.tp + cfg.dim) * act * tokens + 4 * cfg.vocab_size / lp * tokens if last else 0.0
    recompute = 0.0
    if layout.activation_checkpoint == "full":
        kept = len(layers) * stream * in_flight
        # the recomputed layer, and its backward's gradient temporaries (about half a layer's activations)
        recompute = RECOMPUTE * per_layer
    elif layout.activation_checkpoint == "selective":  # matmul and attention outputs kept: about half
        kept = (len(layers) * stream + sum(saved) / 2) * in_flight
    else:
        kept = sum(saved) * in_flight
    activations = kept + head

    copies = LOSS_COPIES + (TP_LOSS_COPIES if d.tp > 1 else 0.0)
    loss_backward = copies * 4 * cfg.vocab_size / lp * tokens if last else 0.0
    gathered = 0.0
    param_bytes = act if dtype != "fp32" and fsdp else 4
    if fsdp and d.data_parallel == "zero3":
        gathered = 2 * param_bytes * block + 4 * block * trained
    elif fsdp:  # zero2 composed: the stage's weights stay gathered from forward to backward
        gathered = param_bytes * n + 4 * block * trained
    elif _paper_zero2(layout):
        gathered = 4 * n * trained * (1 - 1 / zero_n)
    ring = 0.0
    if d.cp > 1:  # ring attention, one layer at a time: the visiting K/V and dK/dV, fp32 out accumulators
        kv = 2 * cfg.n_kv_heads * cfg.head_size / d.tp
        ring = (2 * kv * act + cfg.n_heads * cfg.head_size / d.tp * 4) * tokens
    transient = max(loss_backward, recompute) + gathered + ring
    return MemoryEstimate(params, grads, optim, activations, transient, overhead)


def _fsdp(layout: Layout) -> bool:
    """apply.shards_parameters: zero3 / HSDP / zero2 composed with tp, pp, ep, cp (more than one dp x cp rank)."""
    d = layout.dims
    return d.data_parallel in ("zero2", "zero3") and d.dp * d.cp > 1 and not _paper_zero2(layout)


def _paper_zero2(layout: Layout) -> bool:
    """apply.paper_zero2: ZeRO-2 as in the paper for pure data parallelism."""
    d = layout.dims
    return (d.data_parallel == "zero2" and d.dp > 1 and d.tp == 1 and d.pp == 1 and d.dp_replicate == 1
            and d.ep == 1 and d.cp == 1)
