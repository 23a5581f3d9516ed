"""Ref-counted blocks and the prefix cache, without a model: what is shared, what stays private, what is
evicted and when, and that every reference comes back."""

import pytest
import torch

from cybertron.serve.block_manager import BlockManager
from cybertron.serve.cache import SCRATCH_BLOCK, OutOfBlocks, PagedKVCache

BS = 4


def _manager(num_blocks=8, prefix_caching=True):
    cache = PagedKVCache(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=BS)
    return BlockManager(cache, prefix_caching)


def _computed(blocks, seq_id, tokens, extra=None):
    """Admit `tokens` as sequence seq_id and mark all of them computed; returns its hits."""
    hits = blocks.match(seq_id, tokens, extra)
    blocks.admit(seq_id, tokens, hits, extra)
    blocks.commit(seq_id, tokens, len(tokens), extra)
    return hits


def test_full_blocks_are_shared_and_the_partial_one_stays_private():
    blocks = _manager()
    prompt = list(range(10))  # two full blocks and a partial one
    assert _computed(blocks, 0, prompt) == []
    hits = _computed(blocks, 1, prompt)
    a, b = blocks.cache.tables[0], blocks.cache.tables[1]
    assert hits == a[:2] == b[:2] and a[2] != b[2]
    assert [blocks.ref_count(x) for x in a] == [2, 2, 1]
    assert blocks.num_free == 8 - 4


def test_the_last_token_is_always_computed_even_when_every_block_is_cached():
    blocks = _manager()
    prompt = list(range(8))  # exactly two full blocks
    _computed(blocks, 0, prompt)
    assert blocks.num_cached == 2
    assert blocks.match(1, prompt) == blocks.cache.tables[0][:1]  # its 8th token must produce logits
    assert len(blocks.match(2, prompt + [99])) == 2


def test_a_block_is_keyed_by_its_whole_prefix_and_the_extra_field():
    blocks = _manager()
    _computed(blocks, 0, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert blocks.match(1, [0, 2, 3, 4, 5, 6, 7, 8, 9]) == []  # same second block, other first block
    assert len(blocks.match(2, [1, 2, 3, 4, 5, 6, 7, 0, 9])) == 1  # diverges in the second block
    assert blocks.match(3, [1, 2, 3, 4, 5, 6, 7, 8, 9], extra="adapter-a") == []


def test_freed_blocks_stay_cached_until_the_pool_needs_them_least_recently_used_first():
    blocks = _manager(num_blocks=6)
    _computed(blocks, 0, list(range(9)))  # blocks 1, 2 cached, 3 partial
    table = list(blocks.cache.tables[0])
    blocks.forget(0)
    assert blocks.num_free == 6 and blocks.num_cached == 2
    assert blocks.allocate(4) == [3, 4, 5, 6]  # never-cached blocks first (3 came back uncached)
    # Then the cached ones, tail first: a prefix's first block is the likeliest to be shared again.
    assert blocks.allocate(1) == [table[1]] and blocks.num_cached == 1
    assert len(blocks.match(1, list(range(9)))) == 1
    assert blocks.allocate(1) == [table[0]] and blocks.num_cached == 0
    with pytest.raises(OutOfBlocks):
        blocks.allocate(1)


def test_a_hit_on_a_free_cached_block_takes_it_off_the_free_list():
    blocks = _manager(num_blocks=4)
    prompt = list(range(9))
    _computed(blocks, 0, prompt)
    blocks.forget(0)
    hits = blocks.match(1, prompt)
    assert len(hits) == 2 and blocks.blocks_to_admit(hits, len(prompt)) == 3
    blocks.admit(1, prompt, hits)
    assert blocks.num_free == 1 and [blocks.ref_count(b) for b in hits] == [1, 1]


def test_references_return_to_zero_after_shared_sequences_finish_in_any_order():
    blocks = _manager(num_blocks=12)
    prompt = list(range(12))
    for seq_id in range(3):
        _computed(blocks, seq_id, prompt + [seq_id] * 5)
    for seq_id in (1, 0, 2):
        blocks.forget(seq_id)
    assert blocks.num_free == 12 and blocks.cache.tables == {}
    assert all(blocks.ref_count(b) == 0 for b in range(1, 13))
    blocks.release(7)  # unknown sequence: nothing to do


def test_a_failed_sequence_is_never_cached_and_only_its_own_blocks_are_zeroed():
    blocks = _manager()
    prompt = list(range(10))
    _computed(blocks, 0, prompt)
    _computed(blocks, 1, prompt)
    shared, own = blocks.cache.tables[1][:2], blocks.cache.tables[1][2]
    blocks.cache.k.fill_(1.0)
    blocks.fail(1)
    assert blocks.num_cached == 0 and blocks.match(2, prompt) == []  # the shared prefix is dropped too
    assert torch.all(blocks.cache.k[:, own] == 0) and torch.all(blocks.cache.k[:, SCRATCH_BLOCK] == 0)
    assert torch.all(blocks.cache.k[:, shared] == 1)  # sequence 0 still reads them
    assert [blocks.ref_count(b) for b in shared] == [1, 1]
    blocks.forget(0)
    assert blocks.num_free == blocks.num_total


def test_a_block_being_prefilled_makes_an_identical_prompt_wait_then_hit():
    blocks = _manager()
    prompt = list(range(10))
    blocks.admit(0, prompt, blocks.match(0, prompt))
    hits = blocks.match(1, prompt)
    assert hits == [] and blocks.waits_on_pending(1, prompt, hits)
    assert not blocks.waits_on_pending(0, prompt, [])
    blocks.commit(0, prompt, 6)  # the first block is computed, the second still pending
    hits = blocks.match(1, prompt)
    assert len(hits) == 1 and blocks.waits_on_pending(1, prompt, hits)
    blocks.release(0)  # preempted: nobody computes it any more
    assert not blocks.waits_on_pending(1, prompt, hits)


def test_prefix_caching_off_shares_nothing():
    blocks = _manager(prefix_caching=False)
    prompt = list(range(10))
    _computed(blocks, 0, prompt)
    assert blocks.match(1, prompt) == [] and blocks.num_cached == 0
    blocks.forget(0)
    assert blocks.num_free == blocks.num_total


def test_reset_forgets_every_prefix():
    blocks = _manager()
    prompt = list(range(10))
    _computed(blocks, 0, prompt)
    _computed(blocks, 1, prompt[:5])
    blocks.forget(1)
    blocks.reset()
    assert blocks.num_cached == 0 and blocks.match(2, prompt) == []
    blocks.commit(0, prompt, 10)  # what it computed under the old weights stays unregistered
    assert blocks.num_cached == 0
    blocks.forget(0)
    assert blocks.num_free == blocks.num_total
