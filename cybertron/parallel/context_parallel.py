"""Context parallelism: the cp ranks of a group see the same rows, each holding 1/cp of every sequence, so
a sequence too long for one rank's activations is split over several.

Sharding (load-balanced, the "zigzag" layout): a sequence of T tokens is cut into 2 x cp chunks and cp rank
i holds chunks i and 2cp-1-i. Under a causal mask a late chunk attends to many keys and an early one to
few; pairing them gives every rank the same work. Each rank's tokens carry their global positions
explicitly (RoPE angles and the document mask need them, not the local order).

Attention is a ring (parallel/ring_attention.py): each rank keeps its queries and passes K/V to the next
cp rank step by step, attending one block per step (full, causal or empty by the zigzag chunks' order, plus a
per-block mask from global document ids for packed rows) and merging blocks by log-sum-exp; backward
recomputes the blocks and passes dK/dV around the ring. The first version all-gathered K/V and masked a
(t x T) block of the whole sequence: simplest, but that mask, the gathered K/V and SDPA's saved copies kept
per-rank attention memory from falling with cp. The ring holds only the rank's own q/k/v/out/lse for backward
and one visiting chunk at a time, over point-to-point sends that run on gloo and NCCL alike.

The model knows nothing of this: `apply_context_parallel` replaces each Attention's `attention` callable
(the seam in models/llama.py) and `ContextParallelStep` slices each batch before the method's step function
sees it, so pretraining, SFT and every step function computing losses over token positions work unchanged.
Their loss and unit sums are per-token, so summing them over dp x cp ranks (parallel/collectives.py) gives
the whole sequence's; gradients are reduced over the same ranks by FSDP/DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cybertron.errors import DataError
from cybertron.parallel.blocks import transformer_of
from cybertron.parallel.ring_attention import ProcessGroupRing, ZigzagLayout, ring_attention, zigzag_indices
from cybertron.train.trainer import Batch, StepFunction


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the packed document each token belongs to: a new one wherever the position restarts
    at 0 (or drops), as the single-process mask (models/llama.py) defines it."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    return starts.cumsum(dim=1)


class ContextParallelAttention:
    """The attention callable every Attention of the model shares under context parallelism. `set_batch`
    (once per micro-batch, before the forward) records the sequence length and, for packed rows, the global
    document ids; every layer then reuses that layout. It stays valid through the backward (activation
    checkpointing recomputes attention there) until the next micro-batch's `set_batch`."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ring = ProcessGroupRing(group)
        self.layout: ZigzagLayout | None = None

    def local_indices(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        return zigzag_indices(seq_len, self.cp, self.rank, device)

    def set_batch(self, seq_len: int, positions: torch.Tensor | None, device: torch.device) -> None:
        """positions: (B, T) whole-row positions (packed documents) or None (one causal sequence per row)."""
        documents = None if positions is None else document_ids(positions.to(device))
        self.layout = ZigzagLayout(self.cp, self.rank, seq_len, documents)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object = None) -> torch.Tensor:
        """q, k, v: (B, t, heads, hd) of this rank's tokens; the model's own `mask` (built from the local
        positions alone) is ignored: the layout knows the whole sequence's."""
        assert self.layout is not None, "ContextParallelStep sets the batch before the forward"
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, t, hd)
        return ring_attention(q, k, v, self.ring, self.layout).transpose(1, 2)


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> ContextParallelAttention:
    """Give every attention layer of `model` the context-parallel attention (one shared instance)."""
    attention = ContextParallelAttention(group)
    for block in transformer_of(model).layers.values():
        block.self_attn.attention = attention
    return attention


class ContextParallelStep:
    """Wraps a step function: each (B, T) tensor of the batch is cut to this rank's zigzag chunks, and
    positions (the whole row's, or 0..T-1 when the batch has none) travel with them, before `inner` runs.
    Its loss and units are then this rank's share of the tokens; the Trainer sums them over dp x cp."""

    def __init__(self, inner: StepFunction, attention: ContextParallelAttention):
        self.inner = inner
        self.attention = attention

    def shard(self, batch: Batch) -> Batch:
        inputs = batch["inputs"]
        b, t = inputs.shape[:2]
        if t % (2 * self.attention.cp):
            raise DataError(f"sequences of {t} tokens cannot be split into 2 x parallel.cp = "
                            f"{2 * self.attention.cp} equal chunks; make data.seq_len a multiple of it")
        positions = batch.get("positions")
        if positions is None:
            positions = torch.arange(t, device=inputs.device).expand(b, t)
        mine = self.attention.local_indices(t, inputs.device)
        whole = {**batch, "positions": positions}
        return {key: value[:, mine] if value.dim() >= 2 and value.shape[:2] == (b, t) else value
                for key, value in whole.items()}

    def weight(self, batch: Batch) -> torch.Tensor:
        return self.inner.weight(self.shard(batch))

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        local = self.shard(batch)
        self.attention.set_batch(batch["inputs"].shape[1], batch.get("positions"), batch["inputs"].device)
        return self.inner(model, local)
