"""Ref-counted KV blocks and prefix caching over a PagedKVCache's pool.

A full block's contents are determined by every token up to its end (causal attention), so it is named by a
digest chained over its parent's digest and its own token ids (plus `extra`: anything else that changes the
KV, such as an adapter; None today). A new sequence reuses the longest chain of cached full blocks of its
prompt: those blocks gain a reference and are not prefilled again. Only full blocks are shared; a sequence's
last, partial block is always its own, so nothing ever writes into a shared block.

A block whose last reference goes keeps its contents and its digest, and waits in an LRU list: it is evicted
(its digest forgotten) only when the pool has no never-used block left to hand out. Blocks are released tail
first, so a prefix's later blocks are evicted before its first ones, which other prompts are likelier to share.

The digest is cryptographic: two different prefixes that collided would hand one request another's KV, and a
client could otherwise craft such prompts.

The manager is the cache's allocator (it replaces `cache.allocator`), so `cache.reserve`, `cache.tables` and
`cache.num_free_blocks` keep working; a free block is one with no reference, cached or not.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from cybertron.serve.cache import SCRATCH_BLOCK, OutOfBlocks, PagedKVCache


class BlockManager:
    """`BlockManager(cache)`: reference counts, the digest -> block table and the LRU of cached free blocks."""

    def __init__(self, cache: PagedKVCache, prefix_caching: bool = True):
        self.cache = cache
        self.block_size = cache.block_size
        self.prefix_caching = prefix_caching
        self.num_total = cache.num_total_blocks
        first = SCRATCH_BLOCK + 1
        self._free = list(range(first, first + self.num_total))  # never cached (or forgotten): a min-heap
        self._refs: dict[int, int] = {}
        self._cached: dict[bytes, int] = {}  # digest -> block holding that prefix's KV
        self._digest: dict[int, bytes] = {}  # block -> its digest (only blocks in _cached)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no reference; least recent first
        self._chains: dict[int, list[bytes]] = {}  # sequence -> digests of its full blocks computed so far
        self._committed: dict[int, int] = {}  # sequence -> how many of its leading blocks are registered
        self._pending: dict[bytes, int] = {}  # digest -> sequence whose prefill will compute that block
        cache.allocator = self

    # ---- the allocator protocol (cache.reserve / cache.num_free_blocks) -------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        """n private blocks (reference 1): never-used ones first, then the least recently used cached ones."""
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} KV blocks, {self.num_free} of {self.num_total} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._digest.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block left with none stays cached if it has a digest."""
        for block in blocks:
            assert self._refs.get(block, 0) > 0, f"block {block} freed twice or never allocated"
            self._refs[block] -= 1
            if self._refs[block] == 0:
                del self._refs[block]
                if block in self._digest:
                    self._evictable[block] = None  # the most recently used end
                else:
                    heapq.heappush(self._free, block)

    # ---- sequences -------------------------------------------------------------------------------------------

    def match(self, seq_id: int, tokens: Sequence[int], extra: object = None) -> list[int]:
        """The cached blocks of the longest cached prefix of `tokens`. At most the first len - 1 tokens: the
        last one is always computed, since its logits are what the request samples from."""
        if not self.prefix_caching:
            return []
        hits = []
        for digest in self._chain(seq_id, tokens, (len(tokens) - 1) // self.block_size, extra):
            block = self._cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def waits_on_pending(self, seq_id: int, tokens: Sequence[int], hits: Sequence[int],
                         extra: object = None) -> bool:
        """True if the block after the hits is being computed by another sequence right now: admitted a step
        later, this one would reuse it instead of computing it again."""
        chain = self._chain(seq_id, tokens, (len(tokens) - 1) // self.block_size, extra)
        owner = self._pending.get(chain[len(hits)]) if len(hits) < len(chain) else None
        return owner is not None and owner != seq_id

    def blocks_to_admit(self, hits: Sequence[int], num_tokens: int) -> int:
        """Free blocks that admitting a sequence of num_tokens with these hits takes from the pool (a hit
        with no other reference leaves the free LRU list)."""
        return self.cache.blocks_for(num_tokens) - len(hits) + sum(block not in self._refs for block in hits)

    def admit(self, seq_id: int, tokens: Sequence[int], hits: Sequence[int], extra: object = None) -> int:
        """Give `seq_id` a table: the hit blocks, shared, then private blocks for the rest of `tokens`.
        Returns how many tokens are already cached (OutOfBlocks leaves everything unchanged)."""
        if self.blocks_to_admit(hits, len(tokens)) > self.num_free:
            raise OutOfBlocks(f"admitting sequence {seq_id} needs more KV blocks than are free")
        for block in hits:
            if block in self._evictable:
                del self._evictable[block]
            self._refs[block] = self._refs.get(block, 0) + 1
        self.cache.tables[seq_id] = list(hits)
        self.cache.reserve(seq_id, len(tokens))
        self._committed[seq_id] = len(hits)
        if self.prefix_caching:
            for digest in self._chain(seq_id, tokens, (len(tokens) - 1) // self.block_size, extra)[len(hits):]:
                if digest not in self._cached:
                    self._pending.setdefault(digest, seq_id)
        return len(hits) * self.block_size

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int, extra: object = None) -> None:
        """The KV of tokens[:num_computed] is now in the cache: register the full blocks among them."""
        if not self.prefix_caching:
            return
        full = num_computed // self.block_size
        chain = self._chain(seq_id, tokens, full, extra)
        table = self.cache.tables[seq_id]
        for i in range(self._committed.get(seq_id, 0), full):
            digest = chain[i]
            if self._pending.get(digest) == seq_id:
                del self._pending[digest]
            # The same prefix computed twice (two sequences prefilled it together): the first copy stays
            # the cached one, the second remains private and is freed as usual.
            if digest not in self._cached:
                self._cached[digest], self._digest[table[i]] = table[i], digest
        self._committed[seq_id] = max(full, self._committed.get(seq_id, 0))

    def release(self, seq_id: int) -> None:
        """Return a finished, cancelled or preempted sequence's blocks (tail first into the LRU list). What
        it computed stays cached; a preempted sequence re-admitted later may find its own blocks again."""
        self._forget_pending(seq_id)
        self._committed.pop(seq_id, None)
        self.free(reversed(self.cache.tables.pop(seq_id, [])))

    def forget(self, seq_id: int) -> None:
        """The sequence is gone for good: drop its memoised digests too."""
        self.release(seq_id)
        self._chains.pop(seq_id, None)

    def fail(self, seq_id: int) -> None:
        """A sequence whose logits were not finite: its blocks may hold NaN. None of them is cached any more,
        and the ones only it holds are zeroed (a masked-out NaN key still turns attention into NaN: 0 * NaN)
        before they are freed; shared ones are left to their other holders."""
        table = self.cache.tables.get(seq_id, [])
        for block in table:
            digest = self._digest.pop(block, None)
            if digest is not None:
                del self._cached[digest]
        own = [SCRATCH_BLOCK, *(block for block in table if self._refs.get(block) == 1)]
        index = torch.tensor(own, device=self.cache.device)
        self.cache.k[:, index] = 0
        self.cache.v[:, index] = 0
        self.forget(seq_id)

    def reset(self) -> None:
        """Forget every cached prefix (the model's weights changed, so cached KV is stale). Blocks in use stay
        with their sequences, as private blocks."""
        for block in self._evictable:
            heapq.heappush(self._free, block)
        self._evictable.clear()
        self._cached.clear()
        self._digest.clear()
        self._pending.clear()
        self._committed = {seq_id: len(table) for seq_id, table in self.cache.tables.items()}

    def ref_count(self, block: int) -> int:
        return self._refs.get(block, 0)

    @property
    def num_cached(self) -> int:
        """Blocks with a digest, in use or not."""
        return len(self._cached)

    # ---- digests ---------------------------------------------------------------------------------------------

    def _chain(self, seq_id: int, tokens: Sequence[int], num_blocks: int, extra: object) -> list[bytes]:
        """Digests of the first num_blocks full blocks of `tokens`, memoised per sequence (its tokens only
        grow, so the chain is only ever extended)."""
        chain = self._chains.setdefault(seq_id, [])
        bs = self.block_size
        parent = chain[-1] if chain else hashlib.sha256(repr(extra).encode()).digest()
        for i in range(len(chain), num_blocks):
            parent = hashlib.sha256(parent + struct.pack(f"<{bs}q", *tokens[i * bs:(i + 1) * bs])).digest()
            chain.append(parent)
        return chain[:num_blocks]

    def _forget_pending(self, seq_id: int) -> None:
        for digest in [d for d, owner in self._pending.items() if owner == seq_id]:
            del self._pending[digest]
