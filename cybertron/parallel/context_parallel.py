"""Context parallelism: the cp ranks of a group see the same rows, each holding 1/cp of every sequence, so
a sequence too long for one rank's activations is split over several.

Sharding (load-balanced, the "zigzag" layout): a sequence of T tokens is cut into 2 x cp chunks and cp rank
i holds chunks i and 2cp-1-i. Under a causal mask a late chunk attends to many keys and an early one to
few; pairing them gives every rank the same work. Each rank's tokens carry their global positions
explicitly (RoPE angles and the document mask need them, not the local order).

Attention: every rank all-gathers K and V over the cp group and attends its own queries to the whole
sequence under a mask built from the gathered positions (causal by global position, and no attention across
packed documents: a document starts wherever a row's positions restart). All-gather rather than a ring:
one collective per layer in each direction over plain torch.distributed calls (it runs on gloo), exactly
the single-process arithmetic per query row, and no online-softmax merging to get wrong; its cost is
holding the whole sequence's K and V (B x T x kv_heads x head_dim per layer) transiently, which is small
beside the activations that context parallelism divides by cp (grouped-query attention keeps it smaller
still). A ring that overlaps the exchange with compute is the next step when that memory matters.

The model knows nothing of this: `apply_context_parallel` replaces each Attention's `attention` callable
(the seam in models/llama.py) and `ContextParallelStep` slices each batch before the method's step function
sees it, so pretraining, SFT and every step function computing losses over token positions work unchanged.
Their loss and unit sums are per-token, so summing them over dp x cp ranks (parallel/collectives.py) gives
the whole sequence's; gradients are reduced over the same ranks by FSDP/DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cybertron.errors import DataError
from cybertron.parallel.blocks import transformer_of
from cybertron.train.trainer import Batch, StepFunction


def zigzag_indices(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The global token indices cp rank `rank` holds, in its local order: chunks rank and 2cp-1-rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the packed document each token belongs to: a new one wherever the position restarts
    at 0 (or drops), as the single-process mask (models/llama.py) defines it."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    return starts.cumsum(dim=1)


class _GatherSequence(torch.autograd.Function):
    """All-gather a (B, t, ...) tensor from every cp rank -> (cp, B, t, ...). Backward: every rank used the
    whole gathered tensor, so the gradient of this rank's piece is the sum over ranks of their gradients for
    it (an all-reduce, then this rank's slice; gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


class ContextParallelAttention:
    """The attention callable every Attention of the model shares under context parallelism. `set_batch`
    (once per micro-batch, before the forward) records which global tokens each rank holds and builds this
    rank's mask over the gathered keys; every layer then reuses it. It stays valid through the backward
    (activation checkpointing recomputes attention there) until the next micro-batch's `set_batch`."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.mask: torch.Tensor | None = None
        self._additive: dict[torch.dtype, torch.Tensor] = {}

    def local_indices(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        return zigzag_indices(seq_len, self.cp, self.rank, device)

    def set_batch(self, seq_len: int, positions: torch.Tensor | None, device: torch.device) -> None:
        """positions: (B, T) whole-row positions (packed documents) or None (one causal sequence per row)."""
        mine = self.local_indices(seq_len, device)
        # The gathered keys arrive rank by rank, each in its own zigzag order.
        keys = torch.cat([zigzag_indices(seq_len, self.cp, r, device) for r in range(self.cp)])
        mask = keys[None, :] <= mine[:, None]  # (t, T): causal by global index
        if positions is not None:
            doc = document_ids(positions)  # (B, T)
            mask = mask & (doc[:, mine, None] == doc[:, None, keys])  # (B, t, T)
        self.mask = mask[None, None] if mask.dim() == 2 else mask[:, None]  # (B or 1, 1, t, T)
        self._additive = {}

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as 0 / -inf in the queries' dtype, made once per micro-batch: SDPA's CPU kernel converts
        a bool mask to this form in every call and saves the copy for backward, so one shared copy keeps
        every layer from holding its own (t x T) mask."""
        if dtype not in self._additive:
            additive = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._additive[dtype] = additive.masked_fill_(~self.mask, float("-inf"))
        return self._additive[dtype]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: object = None) -> torch.Tensor:
        """q, k, v: (B, t, heads, hd) of this rank's tokens; the model's own `mask` (built from the local
        positions alone) is ignored in favour of the one over the gathered sequence."""
        assert self.mask is not None, "ContextParallelStep sets the batch before the forward"
        b, t = k.shape[:2]
        k_all = _GatherSequence.apply(k, self.group)  # (cp, B, t, nkv, hd)
        v_all = _GatherSequence.apply(v, self.group)
        k_all = k_all.permute(1, 3, 0, 2, 4).reshape(b, k.shape[2], -1, k.shape[3])  # (B, nkv, T, hd)
        v_all = v_all.permute(1, 3, 0, 2, 4).reshape(b, v.shape[2], -1, v.shape[3])
        q = q.transpose(1, 2)  # (B, nh, t, hd)
        gqa = q.shape[1] != k_all.shape[1]
        mask = self.additive_mask(q.dtype)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)


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
