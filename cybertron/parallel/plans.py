"""Tensor-parallel plans for the Llama family, as data: module FQN pattern -> ParallelStyle.

The residual stream is sequence-sharded (Shard(1)) between blocks when sequence parallelism is on, and
replicated otherwise. Inside a block q/k/v and gate/up are column-parallel (each rank holds whole heads /
FFN columns), o_proj and down_proj row-parallel. The output head is column-parallel over the vocabulary;
with loss parallelism its logits stay vocabulary-sharded and the cross-entropy runs on the shards.

A mixture-of-experts layer (same `mlp` name) is not split over the tensor-parallel ranks: it takes the whole
sequence, replicated, and every tp rank computes the same routing and experts (expert parallelism, not tensor
parallelism, divides the experts); its output goes back to the stream's layout.
"""

from __future__ import annotations

from collections.abc import Collection

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
)

# Attention is called as self_attn(x, cos, sin, mask, cache): only x is laid out; the rest stay local.
_ATTN_EXTRA_ARGS = (None, None, None, None)


def llama_tp_plan(sequence_parallel: bool, loss_parallel: bool, moe_layers: Collection[int] = (),
                  n_layers: int = 0, sandwich_norms: bool = False) -> dict[str, ParallelStyle]:
    """The plan for cybertron.models.llama.Transformer (embed_tokens / layers.* / norm / lm_head).
    moe_layers: indices of the mixture-of-experts layers among the n_layers (ModelConfig.is_moe_layer).
    sandwich_norms: the blocks also have pre_/post_feedforward_layernorm (Gemma; ModelConfig.sandwich_norms)."""
    stream = Shard(1) if sequence_parallel else Replicate()
    # With sequence parallelism the stream stays a DTensor so the model sees global shapes (RoPE positions).
    keep_dtensor = sequence_parallel
    plan: dict[str, ParallelStyle] = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                        use_local_output=not keep_dtensor),
        "layers.*.self_attn": PrepareModuleInput(input_layouts=(stream, *_ATTN_EXTRA_ARGS),
                                                 desired_input_layouts=(Replicate(), *_ATTN_EXTRA_ARGS),
                                                 use_local_output=True),
        "layers.*.self_attn.q_proj": ColwiseParallel(),
        "layers.*.self_attn.k_proj": ColwiseParallel(),
        "layers.*.self_attn.v_proj": ColwiseParallel(),
        "layers.*.self_attn.o_proj": RowwiseParallel(output_layouts=stream, use_local_output=not keep_dtensor),
        "layers.*.mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),),
                                           use_local_output=True),
        "layers.*.mlp.gate_proj": ColwiseParallel(),
        "layers.*.mlp.up_proj": ColwiseParallel(),
        "layers.*.mlp.down_proj": RowwiseParallel(output_layouts=stream, use_local_output=not keep_dtensor),
        "lm_head": ColwiseParallel(input_layouts=stream,
                                   output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
    }
    if moe_layers:
        _split_moe_layers(plan, stream, keep_dtensor, set(moe_layers), n_layers)
    if sequence_parallel:
        plan["layers.*.input_layernorm"] = SequenceParallel()
        plan["layers.*.post_attention_layernorm"] = SequenceParallel()
        plan["norm"] = SequenceParallel()
        if sandwich_norms:
            plan["layers.*.pre_feedforward_layernorm"] = SequenceParallel()
            plan["layers.*.post_feedforward_layernorm"] = SequenceParallel()
    return plan


def _split_moe_layers(plan: dict[str, ParallelStyle], stream, keep_dtensor: bool, moe_layers: Collection[int],
                      n_layers: int) -> None:
    """fnmatch cannot exclude layer numbers, so the `layers.*.mlp` entries become one set per dense layer
    (torch would warn about every MoE layer lacking the dense MLP's linears); each MoE layer gets the whole
    input replicated (plain tensors inside) and hands its replicated output back in the stream's layout."""
    dense = {key.removeprefix("layers.*.mlp"): plan.pop(key) for key in list(plan) if key.startswith("layers.*.mlp")}
    for i in range(n_layers):
        if i in moe_layers:
            plan[f"layers.{i}.mlp"] = PrepareModuleInputOutput(
                input_layouts=(stream,), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(stream,), use_local_output=not keep_dtensor)
        else:
            plan.update({f"layers.{i}.mlp{suffix}": style for suffix, style in dense.items()})
