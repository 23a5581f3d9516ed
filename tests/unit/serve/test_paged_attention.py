"""Attention read through the block table against plain softmax attention over each sequence's tokens."""

import math

import pytest
import torch

from cybertron.serve.cache import PagedKVCache
from cybertron.serve.paged_attention import paged_attention


def _reference(q, k, v, start, cap=None):
    """softmax(q k^T / sqrt(d)) v in float64, query i (at position start + i) over keys 0..start + i; query
    head h reads KV head h // (heads / kv_heads). q: (T, heads, hd); k, v: (S, kv_heads, hd). cap: scores
    soft-capped to cap * tanh(scores / cap) first (Gemma 2)."""
    t, heads, hd = q.shape
    group = heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q.double(), k) / math.sqrt(hd)
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    future = torch.arange(k.shape[0])[None, :] > (start + torch.arange(t))[:, None]
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", weights, v)


def _scattered_batch(n_kv, heads, hd, block_size, starts, new, dtype=torch.float32, seed=0):
    """A pool whose sequences own interleaved (non-consecutive) blocks, filled with random k/v, plus
    right-padded queries; returns what paged_attention takes and each row's own tokens."""
    gen = torch.Generator().manual_seed(seed)
    lens = [s + n for s, n in zip(starts, new)]
    width = max(-(-n // block_size) for n in lens)
    num_blocks = 1 + len(lens) * width
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(len(lens), width)
    k_pool = torch.randn(num_blocks, block_size, n_kv, hd, generator=gen).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, n_kv, hd, generator=gen).to(dtype)
    t = max(new)
    q = torch.randn(len(lens), t, heads, hd, generator=gen).to(dtype)
    positions = torch.tensor([[s + min(i, n - 1) for i in range(t)] for s, n in zip(starts, new)])
    table = ids.clone()
    for row, n in enumerate(lens):
        table[row, -(-n // block_size):] = 0  # padding entries: the scratch block
    flat_k = k_pool[ids].flatten(1, 2)  # (B, width * block_size, kv, hd) each row's tokens in order
    flat_v = v_pool[ids].flatten(1, 2)
    rows = [(flat_k[i, :n], flat_v[i, :n]) for i, n in enumerate(lens)]
    return q, k_pool, v_pool, table, positions, rows


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
@pytest.mark.parametrize("n_kv", [1, 2, 6])
@pytest.mark.parametrize("chunk_blocks", [1, 3, None])
def test_ragged_batch_with_cached_prefixes_equals_dense_softmax(n_kv, chunk_blocks, fused):
    """Rows with cached context (starts > 0) and different numbers of new tokens, including a fresh row and
    single-token decodes, over scattered blocks; several chunk sizes so the merge across chunks is exercised
    (a short row sees none of the later chunks)."""
    starts, new = [0, 7, 21, 40, 3], [9, 5, 1, 1, 12]
    q, k_pool, v_pool, table, positions, rows = _scattered_batch(n_kv, 6, 16, 4, starts, new)
    out = paged_attention(q, k_pool, v_pool, table, positions, visible=min(starts), chunk_blocks=chunk_blocks,
                          fused=fused)
    for i, ((k, v), s, n) in enumerate(zip(rows, starts, new)):
        expected = _reference(q[i, :n], k, v, s).float()
        torch.testing.assert_close(out[i, :n], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_blocks", [1, 3, None])
def test_soft_capped_scores_merge_exactly_across_chunks(chunk_blocks):
    """Gemma 2's capped scores, chunk by chunk with the online softmax (and one chunk through the explicit-score
    attention): the same as capping the whole score matrix. A cap of 0.5 on scores that reach several units,
    so uncapped attention is far off."""
    starts, new = [0, 7, 21, 40, 3], [9, 5, 1, 1, 12]
    q, k_pool, v_pool, table, positions, rows = _scattered_batch(2, 6, 16, 4, starts, new)
    out = paged_attention(q * 4, k_pool, v_pool, table, positions, visible=min(starts), chunk_blocks=chunk_blocks,
                          softcap=0.5)
    for i, ((k, v), s, n) in enumerate(zip(rows, starts, new)):
        expected = _reference(q[i, :n] * 4, k, v, s, cap=0.5).float()
        torch.testing.assert_close(out[i, :n], expected, atol=1e-5, rtol=1e-5)
        assert (_reference(q[i, :n] * 4, k, v, s).float() - expected).abs().max() > 1e-2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_visible_prefix_skips_the_mask_without_changing_the_result(fused):
    starts, new = [33, 40], [4, 2]
    q, k_pool, v_pool, table, positions, rows = _scattered_batch(2, 4, 8, 4, starts, new)
    masked = paged_attention(q, k_pool, v_pool, table, positions, visible=0, chunk_blocks=2, fused=fused)
    skipped = paged_attention(q, k_pool, v_pool, table, positions, visible=33, chunk_blocks=2, fused=fused)
    torch.testing.assert_close(skipped, masked, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "matmul"])
def test_bf16_pool_accumulates_in_fp32(fused):
    starts, new = [30, 5], [1, 3]
    q, k_pool, v_pool, table, positions, rows = _scattered_batch(2, 4, 16, 4, starts, new, dtype=torch.bfloat16)
    out = paged_attention(q, k_pool, v_pool, table, positions, chunk_blocks=2, fused=fused)
    assert out.dtype == torch.bfloat16
    for i, ((k, v), s, n) in enumerate(zip(rows, starts, new)):
        expected = _reference(q[i, :n], k, v, s)  # the same bf16 inputs, exact arithmetic
        torch.testing.assert_close(out[i, :n].double(), expected, atol=1e-2, rtol=1e-2)


def test_cache_batch_paged_and_gather_paths_agree_on_a_ragged_decode_batch():
    """The engine-facing view: a ragged decode batch (two prompts of different lengths, then a step with
    both), read by the paged path and by the earlier gather path."""
    torch.manual_seed(0)
    outs = {}
    for method in ("paged", "gather"):
        cache = PagedKVCache(n_layers=1, n_kv_heads=2, head_dim=8, num_blocks=16, block_size=4)
        cache.attention = method
        torch.manual_seed(0)
        for seq, n in ((0, 11), (1, 3)):
            cache.reserve(seq, n + 1)
            k, v = torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
            cache.batch([seq], [0], [n]).attend(0, torch.randn(1, n, 4, 8), k, v)
        q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
        outs[method] = cache.batch([0, 1], [11, 3], [1, 1]).attend(0, q, k, v)
    torch.testing.assert_close(outs["paged"], outs["gather"], atol=1e-6, rtol=1e-5)
