"""A relative step time per layout: a simple model to rank layouts, not a prediction of seconds.

time per token = (compute + exposed communication) / tokens the whole world processes per step, where
- compute: 6 x active parameters + 6 x layers x attention width x seq_len / 2 (causal) FLOPs per token (forward
  + backward), spread over all ranks, at `tflops` per GPU; x 4/3 with full activation checkpointing (one more
  forward), x 1.1 with selective; divided by a tensor-parallel efficiency 1 / (1 + 0.1 x (tp - 1)) (smaller
  matmuls); and stretched by the pipeline bubble: / (1 - (pp - 1) / (m + pp - 1)) for m micro-batches.
- communication, bytes each rank sends, over `bandwidth` per GPU:
  tensor parallelism (exposed: on the critical path): 4 all-gathers / reduce-scatters of the layer's
  activations per layer forward, 4 backward, each (tp - 1) / tp x tokens x dim x activation bytes;
  context parallelism (exposed): k and v of the other (cp - 1) chunks per layer, forward and twice backward;
  expert parallelism (exposed): 4 all-to-alls of top_k x tokens x dim per MoE layer;
  pipeline (exposed): one activation send per micro-batch per stage boundary, each way;
  data parallelism (overlapped with backward, only the excess counts): the gradient all-reduce (2 x (N - 1)
  / N x 4 bytes per parameter) for ddp / zero1 / zero2, plus the forward and backward parameter all-gathers
  for FSDP2 (zero3 / HSDP: 1.5 x the all-reduce's volume at fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

from cybertron.models.config import ModelConfig
from cybertron.plan.layouts import Layout
from cybertron.plan.memory import ACT_BYTES


@dataclass(frozen=True)
class Hardware:
    tflops: float = 989.0 * 0.4  # dense bf16 peak of an H100/H200 at a typical 40% utilisation
    bandwidth_gbs: float = 200.0  # per-GPU collective bandwidth (NVLink class)


def step_seconds(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str = "bf16",
                 hw: Hardware | None = None) -> tuple[float, float]:
    """(modelled seconds per step, tokens the world processes per step)."""
    hw = hw or Hardware()
    d = layout.dims
    act = ACT_BYTES[dtype]
    tokens_rank = layout.micro_batch * seq_len / d.cp  # per micro-batch, per rank
    world_tokens = layout.sequences_per_step * seq_len * d.dp
    attn_width = cfg.n_heads * cfg.head_size
    flops_token = (6 * cfg.num_params(include_embedding=False, active=True)
                   + 6 * cfg.n_layers * attn_width * seq_len / 2)
    compute = flops_token * world_tokens / (d.world_size * hw.tflops * 1e12)
    compute *= {"none": 1.0, "full": 4 / 3, "selective": 1.1}[layout.activation_checkpoint]
    compute *= 1 + 0.1 * (d.tp - 1)
    m = layout.pp_microbatches
    if d.pp > 1:
        compute /= 1 - (d.pp - 1) / (m + d.pp - 1)
    bw = hw.bandwidth_gbs * 1e9
    layers = cfg.n_layers / d.pp
    micro = m if d.pp > 1 else 1
    exposed = 0.0
    if d.tp > 1:
        exposed += 8 * layers * micro * (d.tp - 1) / d.tp * tokens_rank * cfg.dim * act / bw
    if d.cp > 1:
        kv = 2 * cfg.n_kv_heads * cfg.head_size
        exposed += 3 * layers * micro * (d.cp - 1) * tokens_rank * kv * act / d.tp / bw
    if d.ep > 1:
        moe = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers)) / d.pp
        exposed += 4 * moe * micro * cfg.top_k * tokens_rank * cfg.dim * act * (d.ep - 1) / d.ep / bw
    if d.pp > 1:
        exposed += 2 * micro * tokens_rank * cfg.dim * act / d.tp / bw
    n = d.dp * d.cp
    if n > 1:
        params_rank = cfg.num_params() / (d.tp * d.pp)
        volume = 2 * (n - 1) / n * 4 * params_rank
        if d.data_parallel in ("zero2", "zero3") and (d.tp > 1 or d.pp > 1 or d.ep > 1 or d.cp > 1
                                                      or d.dp_replicate > 1 or d.data_parallel == "zero3"):
            volume *= 1.5
        backward = compute * 2 / 3
        exposed += max(0.0, volume / bw - backward)
    return compute + exposed, world_tokens


def time_per_token(cfg: ModelConfig, layout: Layout, seq_len: int, dtype: str = "bf16",
                   hw: Hardware | None = None) -> float:
    seconds, tokens = step_seconds(cfg, layout, seq_len, dtype, hw)
    return seconds / tokens
