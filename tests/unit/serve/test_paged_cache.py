"""Block allocator, block tables and paged attention against dense attention."""

import pytest
import torch

from cybertron.models.llama import causal_attention
from cybertron.serve.cache import BlockAllocator, OutOfBlocks, PagedKVCache


def test_allocator_hands_out_distinct_blocks_until_exhausted():
    alloc = BlockAllocator(6, first_id=1)
    a, b = alloc.allocate(4), alloc.allocate(2)
    assert sorted(a + b) == [1, 2, 3, 4, 5, 6]
    assert alloc.num_free == 0
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)
    alloc.free(a)
    assert alloc.num_free == 4
    with pytest.raises(OutOfBlocks):
        alloc.allocate(5)
    assert alloc.num_free == 4  # a failed allocation takes nothing


def test_allocator_prefers_low_ids_so_a_lone_sequence_is_contiguous():
    alloc = BlockAllocator(8)
    first = alloc.allocate(3)
    alloc.free([first[1]])
    assert alloc.allocate(1) == [first[1]]
    assert alloc.allocate(2) == [3, 4]


def test_double_free_is_caught():
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(2)
    alloc.free(blocks)
    with pytest.raises(AssertionError):
        alloc.free(blocks[:1])


def test_block_tables_grow_one_block_at_a_time_and_release_everything():
    cache = PagedKVCache(n_layers=2, n_kv_heads=2, head_dim=8, num_blocks=5, block_size=4)
    cache.reserve(7, 1)
    assert len(cache.tables[7]) == 1
    cache.reserve(7, 4)
    assert len(cache.tables[7]) == 1  # still fits in one block
    cache.reserve(7, 5)
    assert len(cache.tables[7]) == 2
    cache.reserve(8, 12)
    assert cache.num_free_blocks == 0
    with pytest.raises(OutOfBlocks):
        cache.reserve(7, 9)
    assert len(cache.tables[7]) == 2  # unchanged by the failure
    assert set(cache.tables[7]).isdisjoint(cache.tables[8])
    cache.release(7)
    cache.release(8)
    cache.release(9)  # unknown sequence: nothing to do
    assert cache.num_free_blocks == cache.num_total_blocks == 5


def _attend(cache, seq_ids, starts, chunks, layer=0):
    """Run one paged step for these sequences; chunks[i] = (q, k, v) each (T_i, heads, hd)."""
    lens = [c[0].shape[0] for c in chunks]
    width = max(lens)

    def pad(i, j):
        x = chunks[i][j]
        return torch.cat([x, x[-1:].expand(width - x.shape[0], *x.shape[1:])])

    q, k, v = (torch.stack([pad(i, j) for i in range(len(chunks))]) for j in range(3))
    for seq, start, n in zip(seq_ids, starts, lens):
        cache.reserve(seq, start + n)
    batch = cache.batch(seq_ids, starts, lens)
    return batch.attend(layer, q, k, v)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_paged_attention_equals_dense_causal_attention(n_kv_heads):
    """Three sequences written in pieces (a prefill, a chunk on top of cached context, single-token
    decodes), interleaved so their blocks are scattered, attend exactly as over their whole k/v at once."""
    torch.manual_seed(0)
    heads, hd = 4, 8
    cache = PagedKVCache(n_layers=1, n_kv_heads=n_kv_heads, head_dim=hd, num_blocks=32, block_size=4)
    lengths = {0: [5, 3, 1, 1], 1: [2, 7, 1, 1], 2: [9, 1, 4, 1]}
    full = {s: [torch.randn(sum(ls), h, hd) for h in (heads, n_kv_heads, n_kv_heads)] for s, ls in lengths.items()}
    done = dict.fromkeys(lengths, 0)
    got = {s: [] for s in lengths}
    for step in range(4):
        seqs = list(lengths)
        chunks = [[x[done[s]:done[s] + lengths[s][step]] for x in full[s]] for s in seqs]
        out = _attend(cache, seqs, [done[s] for s in seqs], chunks)
        for i, s in enumerate(seqs):
            got[s].append(out[i, :lengths[s][step]])
            done[s] += lengths[s][step]
    for s, (q, k, v) in full.items():
        expected = causal_attention(q[None], k[None], v[None])[0]
        torch.testing.assert_close(torch.cat(got[s]), expected, atol=1e-5, rtol=1e-5)


def test_lone_sequence_decode_uses_the_contiguous_view():
    cache = PagedKVCache(n_layers=1, n_kv_heads=2, head_dim=8, num_blocks=8, block_size=4)
    cache.reserve(0, 9)
    assert cache.batch([0], [8], [1]).span == (cache.tables[0][0] * 4, 9)
    cache.reserve(1, 3)
    cache.reserve(0, 13)  # its next block is no longer adjacent
    assert cache.batch([0], [12], [1]).span is None
