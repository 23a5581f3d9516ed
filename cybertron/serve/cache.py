"""Paged KV cache: fixed-size blocks in one preallocated pool per layer, handed out by a free-list allocator.

A sequence owns a block table (the list of its block ids); its token at position p lives in block
`table[p // block_size]`, row `p % block_size`. Sequences of any length share the pool without
fragmentation, and a finished or cancelled request returns its blocks at once.

The model never sees any of this: it calls `cache.attend(layer, q, k, v)` on a `CacheBatch`, the per-step
view that knows which sequence each batch row is, where the new tokens go and how much context each row has.
Attention reads the pool through the block table (serve/paged_attention.py).

Block 0 is a scratch block that belongs to no sequence: padded token slots of a ragged batch are written
there, so a batch needs no masking of its writes (and no host-side branching, which CUDA graphs forbid).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cybertron.models.llama import causal_attention
from cybertron.models.masks import window_visible_keys
from cybertron.models.softcap import capped_attention
from cybertron.serve.paged_attention import paged_attention

SCRATCH_BLOCK = 0
ATTENTION_METHODS = ("paged", "gather")


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for; the scheduler waits or preempts (not a user error)."""


class BlockAllocator:
    """Free list of block ids. Hands out the lowest free ids first, so a sequence that grows alone gets
    consecutive blocks and its cache can be read as one contiguous slice (see CacheBatch)."""

    def __init__(self, num_blocks: int, first_id: int = 0):
        if num_blocks <= 0:
            raise ValueError(f"a KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_total = num_blocks
        self._free = list(range(first_id, first_id + num_blocks))  # already a valid min-heap
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n block ids, or OutOfBlocks (and nothing allocated) when fewer than n are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} of {self.num_total} free")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        self._owned.update(blocks)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            assert block in self._owned, f"block {block} freed twice or never allocated"
            self._owned.remove(block)
            heapq.heappush(self._free, block)


class PagedKVCache:
    """K and v pools of shape (n_layers, 1 + num_blocks, block_size, n_kv_heads, head_dim), an allocator
    and one block table per sequence id.

    `attention` picks how CacheBatch attends over cached context: "paged" reads the pool through the block
    table; "gather" first copies each row's blocks into one dense tensor (the earlier path, kept so
    bench/decode.py can compare the two)."""

    attention = "paged"

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.device = torch.device(device)
        shape = (n_layers, 1 + num_blocks, block_size, n_kv_heads, head_dim)
        # Zeros, not empty: a masked-out key still enters q @ k, and NaN garbage would survive the mask.
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.allocator = BlockAllocator(num_blocks, first_id=SCRATCH_BLOCK + 1)
        self.tables: dict[int, list[int]] = {}
        # Sliding window per layer (None: full); the engine sets it from the model config (h4).
        self.layer_windows: list[int | None] = [None] * n_layers
        # Attention scores soft-capped at this value (Gemma 2's attn_logit_softcapping), None: uncapped; the
        # engine sets it from the model config, and the model refuses a cache whose cap differs from its own.
        self.attn_softcap: float | None = None

    @property
    def num_total_blocks(self) -> int:
        return self.allocator.num_total

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @staticmethod
    def bytes_per_block(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        """Memory of one block across all layers, k and v: what a memory budget is divided by."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * block_size * n_kv_heads * head_dim * itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """How many more blocks sequence `seq_id` needs to hold `num_tokens` tokens in all."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; OutOfBlocks leaves it unchanged."""
        extra = self.extra_blocks_needed(seq_id, num_tokens)
        blocks = self.allocator.allocate(extra) if extra else []
        self.tables.setdefault(seq_id, []).extend(blocks)

    def clear(self, seq_id: int) -> None:
        """Zero a sequence's blocks and the scratch block (after it produced NaN: see the pools' comment)."""
        blocks = torch.tensor([SCRATCH_BLOCK, *self.tables.get(seq_id, ())], device=self.device)
        self.k[:, blocks] = 0
        self.v[:, blocks] = 0

    def release(self, seq_id: int) -> None:
        """Return a sequence's blocks to the pool (finished, cancelled or preempted); no-op if it has none."""
        self.allocator.free(self.tables.pop(seq_id, []))

    def batch(self, seq_ids: Sequence[int], starts: Sequence[int], num_new: Sequence[int],
              rope_lengths: Sequence[int] | None = None) -> CacheBatch:
        """The view for one forward: row i is sequence seq_ids[i], whose first starts[i] tokens are cached
        and whose num_new[i] new tokens are in this batch (rows padded on the right to max(num_new)).
        rope_lengths: each row's whole length when this is one chunk of a longer prefill (length-dependent
        RoPE takes its angles from it)."""
        return CacheBatch.build(self, seq_ids, starts, num_new, rope_lengths)


@dataclass
class CacheBatch:
    """Per-step view of the cache for a batch of sequences. Index tensors are built once per step on the
    host, moved to the device in one go, and shared by every layer."""

    cache: PagedKVCache
    positions: torch.Tensor  # (B, T) absolute positions of the new tokens (padding repeats the last one)
    slots: torch.Tensor  # (B * T,) flat pool rows the new k/v go to (padding -> the scratch block)
    block_table: torch.Tensor  # (B, max_blocks), padded with the scratch block
    context_lens: torch.Tensor  # (B,) tokens cached after this step, new ones included
    fresh: bool  # no row has cached context: attention runs over the new k/v alone
    span: tuple[int, int] | None  # one sequence in consecutive blocks: (first pool row, context length)
    mask: torch.Tensor | None  # (B, 1, T, S) for the gather path, built once and shared by all layers
    visible: int = 0  # keys below this position are visible to every query (the smallest start in the batch)
    # (B, 1) the length each row's sequence reaches in the forward this chunk belongs to, for length-dependent
    # RoPE (models/rope.py); None: each row's last position + 1
    rope_lengths: torch.Tensor | None = None

    @classmethod
    def build(cls, cache: PagedKVCache, seq_ids: Sequence[int], starts: Sequence[int],
              num_new: Sequence[int], rope_lengths: Sequence[int] | None = None) -> CacheBatch:
        bs, t = cache.block_size, max(num_new)
        positions, slots, tables = [], [], []
        for seq_id, start, n in zip(seq_ids, starts, num_new):
            table = cache.tables[seq_id]
            assert len(table) * bs >= start + n, f"sequence {seq_id} has no room reserved for {n} new tokens"
            row = range(start, start + n)
            positions.append([*row] + [start + n - 1] * (t - n))
            slots.extend([table[p // bs] * bs + p % bs for p in row] + [SCRATCH_BLOCK * bs] * (t - n))
            tables.append(table[:cache.blocks_for(start + n)])
        lens = [start + n for start, n in zip(starts, num_new)]
        width = max(len(table) for table in tables)
        fresh = all(start == 0 for start in starts)
        span = None
        if len(tables) == 1 and t == 1 and _consecutive(tables[0]):
            span = (tables[0][0] * bs, lens[0])

        def put(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(cache.device, non_blocking=True)

        batch = cls(cache=cache, positions=put(positions), slots=put(slots),
                    block_table=put([tb + [SCRATCH_BLOCK] * (width - len(tb)) for tb in tables]),
                    context_lens=put(lens), fresh=fresh, span=span, mask=None, visible=min(starts),
                    rope_lengths=None if rope_lengths is None else put([[n] for n in rope_lengths]))
        if not fresh and span is None and cache.attention == "gather":
            batch.mask = visible_keys(batch.positions, width * bs)
        return batch

    @property
    def layer_windows(self) -> list[int | None]:  # h4: what the model checks before trusting a windowed cache
        return self.cache.layer_windows

    @property
    def attn_softcap(self) -> float | None:  # what a soft-capped model checks before trusting the cache
        return self.cache.attn_softcap

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k/v into the pool, then attend q over each row's whole cached context."""
        b, t, n_kv, hd = k.shape
        k_pool = self.cache.k[layer_idx].view(-1, n_kv, hd)  # (num_blocks * block_size, nkv, hd)
        v_pool = self.cache.v[layer_idx].view(-1, n_kv, hd)
        k_pool.index_copy_(0, self.slots, k.reshape(b * t, n_kv, hd))
        v_pool.index_copy_(0, self.slots, v.reshape(b * t, n_kv, hd))
        cap = self.cache.attn_softcap
        # --- sliding window (h4): a sliding layer masks keys older than its window (models/masks.py) ---
        window = self.cache.layer_windows[layer_idx]
        if window is not None:
            keys = _gather(self.cache.k[layer_idx], self.block_table)
            values = _gather(self.cache.v[layer_idx], self.block_table)
            return _sdpa(q, keys, values, window_visible_keys(self.positions, keys.shape[1], window), cap)
        # --- end sliding window ---
        if self.fresh:
            # Prefill from position 0: the context is exactly the new tokens. Right padding is harmless
            # under a causal mask, since a real token never sees a later (padded) one.
            if cap is not None:
                return capped_attention(q, k, v, visible_keys(self.positions, t), cap)
            return causal_attention(q, k, v)
        if self.span is not None:
            # One sequence in consecutive blocks (the usual batch-1 decode): a view, no gather, no mask.
            first, length = self.span
            keys, values = k_pool[first:first + length][None], v_pool[first:first + length][None]
            return _sdpa(q, keys, values, None, cap)
        if self.cache.attention == "paged":
            return paged_attention(q, self.cache.k[layer_idx], self.cache.v[layer_idx], self.block_table,
                                   self.positions, self.visible, softcap=cap)
        keys = _gather(self.cache.k[layer_idx], self.block_table)  # (B, S, nkv, hd)
        values = _gather(self.cache.v[layer_idx], self.block_table)
        mask = self.mask if self.mask is not None else visible_keys(self.positions, keys.shape[1])
        return _sdpa(q, keys, values, mask, cap)


def _gather(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Each row's blocks, in table order, as one (B, blocks * block_size, nkv, hd) tensor. An embedding
    lookup of whole blocks: faster on CPU than advanced indexing (`pool[block_table]`; bench/RESULTS.md)."""
    num_blocks, block_size, n_kv, hd = pool.shape
    rows = F.embedding(block_table, pool.view(num_blocks, -1))  # (B, max_blocks, block_size * nkv * hd)
    return rows.view(block_table.shape[0], -1, n_kv, hd)


def _consecutive(blocks: list[int]) -> bool:
    return blocks[-1] - blocks[0] == len(blocks) - 1 and all(b - a == 1 for a, b in zip(blocks, blocks[1:]))


def visible_keys(positions: torch.Tensor, s: int) -> torch.Tensor:
    """(B, 1, T, S) bool: key j is visible to a query at position p iff j <= p (causal, and never past the
    row's context, since p < context length; padded queries repeat a real position so no row is empty)."""
    key_pos = torch.arange(s, device=positions.device)
    return (key_pos[None, None, :] <= positions[:, :, None])[:, None]


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
          cap: float | None = None) -> torch.Tensor:
    if cap is not None:  # soft-capped scores (Gemma 2): SDPA has no hook for them
        return capped_attention(q, keys, values, mask, cap)
    q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, heads, ., hd)
    gqa = q.shape[1] != keys.shape[1]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
