"""Ring attention over zigzag-sharded sequences: each cp rank keeps its own queries and passes K/V around the
cp ring, attending one (its queries, the visiting K/V) block per step and merging the blocks by their
log-sum-exp; backward recomputes the blocks and passes dK/dV around the ring the same way (flash-attention
style). Per rank it holds its own q/k/v/out/lse for backward and one visiting K/V chunk at a time, never a
(t x T) mask or the whole sequence's K/V, so its memory follows the rank's share of the sequence.

Under the zigzag layout (rank r holds chunks r and 2cp-1-r of 2cp) the causal structure of a block is one of
three, from the ranks alone (the design of zhuzilin/ring-flash-attention's zigzag ring):
- the rank's own K/V: causal over its local order (local order is increasing global order);
- K/V of an earlier rank (src < r): every query sees the visitor's first chunk, none its second;
- K/V of a later rank (src > r): only the rank's second chunk of queries sees them, all of them.
Packed documents split a step into (query chunk, key chunk) blocks, each with a chunk x chunk mask from the
global document ids (blocks sharing no document are skipped); nothing is built for the whole sequence.

A block is one call of PyTorch's CPU flash-attention kernel (out and logsumexp forward; its backward takes
the merged out and lse, which is exactly what a block's gradient needs) on CPU, and plain matmuls elsewhere
(`matmul_block_*`: fp32 scores a tile of query rows at a time; CUDA's flash kernels would be faster, but no
GPU was at hand to test them, so this portable path is what runs there for now)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

_KV_TAG, _GRAD_TAG = 7101, 7102  # K/V and dK/dV may be in flight between the same ranks at once


def zigzag_indices(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """The global token indices cp rank `rank` holds, in its local order: chunks rank and 2cp-1-rank."""
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


class Ring(Protocol):
    """The cp ring as the kernel sees it: `shift` starts sending `tensor` to the next rank and receiving the
    previous rank's tensor of the same shape; the returned callable waits and gives what arrived."""

    size: int
    rank: int

    def shift(self, tensor: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]: ...


class ProcessGroupRing:
    """A Ring over a torch.distributed group: point-to-point isend/irecv (gloo and NCCL both have them)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]:
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
               dist.P2POp(dist.irecv, received, self.prev, self.group, tag)]
        works = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            ops.clear()  # the sent tensor is referenced until its send has completed
            return received

        return wait


@dataclass
class Block:
    """One attention call of a step: this rank's query rows `q` against rows `k` of the visiting K/V."""

    q: slice
    k: slice
    causal: bool  # causal over the local order (the rank's own K/V only)
    mask: torch.Tensor | None  # (B, 1, nq, nk) bool from document ids, causality folded in; None: none


class ZigzagLayout:
    """Which block each ring step computes, for rank `rank` of `cp` holding `2 x chunk` tokens.
    `documents`: (B, T) document id of every token of the whole rows (packed documents) or None."""

    def __init__(self, cp: int, rank: int, seq_len: int, documents: torch.Tensor | None = None):
        self.cp, self.rank, self.chunk = cp, rank, seq_len // (2 * cp)
        self.documents = None if documents is None else [
            documents[:, zigzag_indices(seq_len, cp, r, documents.device)] for r in range(cp)]

    def blocks(self, step: int) -> list[Block]:
        """The blocks of ring step `step` (K/V of rank rank - step); none when nothing attends. Plain rows:
        one block a step. Packed rows: one per (query chunk, key chunk) pair that shares a document, each
        with its chunk x chunk mask."""
        src = (self.rank - step) % self.cp
        c = self.chunk
        if self.documents is None:
            if step == 0:
                return [Block(slice(None), slice(None), True, None)]
            if src < self.rank:
                return [Block(slice(None), slice(0, c), False, None)]
            return [Block(slice(c, None), slice(None), False, None)]
        blocks = []
        for qi, q_chunk in enumerate((self.rank, 2 * self.cp - 1 - self.rank)):
            for ki, k_chunk in enumerate((src, 2 * self.cp - 1 - src)):
                if k_chunk > q_chunk:
                    continue  # every key after every query
                q, k = slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c)
                mask = self.documents[self.rank][:, q, None] == self.documents[src][:, None, k]
                if k_chunk == q_chunk:
                    mask = mask & torch.ones(c, c, dtype=torch.bool, device=mask.device).tril()
                if mask.any():
                    blocks.append(Block(q, k, False, mask[:, None]))
        return blocks


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _empty_rows(lse: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A query row with no key in the block has lse -inf (the CPU kernel reports 0 and a zero output)."""
    if mask is None:
        return lse
    return lse.masked_fill(~mask.any(dim=-1), float("-inf"))


def flash_cpu_block_forward(q, k, v, block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    mask = None if block.mask is None else _additive(block.mask, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, block.causal, attn_mask=mask)
    return out, _empty_rows(lse, block.mask)


def flash_cpu_block_backward(dout, q, k, v, out, lse, block: Block):
    mask = None if block.mask is None else _additive(block.mask, q.dtype)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, block.causal, attn_mask=mask)


# The matmul kernel holds this many fp32 scores (over batch, heads, query rows and keys) at a time: a block's
# whole score matrix would be (2 x chunk)^2 per head, the term ring attention exists to avoid.
TILE_ELEMENTS = 1 << 22


def _row_tiles(q: torch.Tensor, n_keys: int, tile_elements: int) -> list[slice]:
    rows = max(1, tile_elements // max(1, q.shape[0] * n_keys))
    return [slice(r, min(r + rows, q.shape[2])) for r in range(0, q.shape[2], rows)]


def _scores(q, k, block: Block, rows: slice) -> torch.Tensor:
    """(B, nh, rows, nk) fp32 scaled scores of query rows `rows` of a block, masked with -inf; k already has
    as many heads as q."""
    s = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if block.causal:  # row i of the block sees keys 0..i (own K/V: the same local order)
        i = torch.arange(rows.start, rows.stop, device=s.device)[:, None]
        s = s.masked_fill(torch.arange(k.shape[2], device=s.device)[None, :] > i, float("-inf"))
    if block.mask is not None:
        s = s.masked_fill(~block.mask[:, :, rows], float("-inf"))
    return s


def matmul_block_forward(q, k, v, block: Block, tile_elements: int = TILE_ELEMENTS):
    """Plain-matmul block: any device, fp32 scores, about `tile_elements` of them at a time."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for rows in _row_tiles(q, k.shape[2] * q.shape[1], tile_elements):
        s = _scores(q, k, block, rows)
        lse[:, :, rows] = s.logsumexp(dim=-1)
        p = (s - lse[:, :, rows].nan_to_num(neginf=0.0)[..., None]).exp()  # rows with no key: all 0
        out[:, :, rows] = p @ v
    return out, lse


def matmul_block_backward(dout, q, k, v, out, lse, block: Block, tile_elements: int = TILE_ELEMENTS):
    groups = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    for rows in _row_tiles(q, k.shape[2] * q.shape[1], tile_elements):
        p = (_scores(q, kf, block, rows) - lse[:, :, rows, None]).exp()  # probabilities under the merged lse
        do = dout[:, :, rows].float()
        dv += p.transpose(-1, -2) @ do
        dp = do @ vf.transpose(-1, -2)
        ds = p * (dp - (do * out[:, :, rows].float()).sum(dim=-1, keepdim=True)) * q.shape[-1] ** -0.5
        dq[:, :, rows] = ds @ kf
        dk += ds.transpose(-1, -2) @ q[:, :, rows].float()
    fold = lambda g: g.unflatten(1, (k.shape[1], groups)).sum(dim=2)  # grouped query heads -> their kv head
    return dq, fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _kernels(device: torch.device):
    if device.type == "cpu":
        return flash_cpu_block_forward, flash_cpu_block_backward
    return matmul_block_forward, matmul_block_backward


class RingAttention(torch.autograd.Function):
    """q: (B, nh, t, hd), k and v: (B, nkv, t, hd), this rank's tokens in zigzag order -> out like q.
    Saves q, k, v, out and lse (B, nh, t) fp32 only."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, layout: ZigzagLayout, kernels=None):
        block_forward, block_backward = kernels or _kernels(q.device)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        for step in range(ring.size):
            arriving = ring.shift(kv, _KV_TAG) if step + 1 < ring.size else None
            for block in layout.blocks(step):
                o_b, l_b = block_forward(q[:, :, block.q], kv[0][:, :, block.k], kv[1][:, :, block.k], block)
                _merge(out[:, :, block.q], lse[:, :, block.q], o_b, l_b)
            if arriving is not None:
                kv = arriving()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.layout, ctx.block_backward = ring, layout, block_backward
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, layout = ctx.ring, ctx.layout
        dout = dout.contiguous().to(q.dtype)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv_arriving = None
        for step in range(ring.size):
            kv_arriving = ring.shift(kv, _KV_TAG) if step + 1 < ring.size else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # for the visiting K/V
            for block in layout.blocks(step):
                qs, ks = block.q, block.k
                dq_b, dk_b, dv_b = ctx.block_backward(
                    dout[:, :, qs], q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], out[:, :, qs],
                    lse[:, :, qs], block)
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += dk_b
                dkv[1][:, :, ks] += dv_b
            if dkv_arriving is not None:  # what the ranks before this one added for the same K/V
                dkv += dkv_arriving()
            # after cp shifts each rank's dK/dV, summed over every rank that saw its K/V, is back home
            dkv_arriving = ring.shift(dkv, _GRAD_TAG)
            if kv_arriving is not None:
                kv = kv_arriving()
        dkv = dkv_arriving()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def _merge(out: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, l_b: torch.Tensor) -> None:
    """Fold one block's (out, lse) into the running ones in place (views into the whole accumulators)."""
    new = torch.logaddexp(lse, l_b)
    shift = new.nan_to_num(neginf=0.0)  # rows no block has reached yet stay 0 rather than nan
    out.mul_((lse - shift).exp()[..., None]).add_(o_b.float() * (l_b - shift).exp()[..., None])
    lse.copy_(new)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, layout: ZigzagLayout,
                   kernels=None) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence; (B, heads, t, hd) tensors."""
    return RingAttention.apply(q, k, v, ring, layout, kernels)
