"""Attention over a paged KV pool, read through the block table a few blocks at a time.

Each step walks the block-table columns in chunks: it looks up one chunk of every row's blocks (a
cache-sized piece, never the whole context), scores the queries against it and folds the result into a
running softmax (the online softmax of flash attention: a running max, a running sum of exponentials and a
running weighted sum of values, rescaled whenever the max grows). The result equals softmax attention over
each row's whole context, without the dense (B, S, kv_heads, head_dim) copy of every row that a gather
followed by one attention call makes.

Grouped-query attention is folded into the matmuls: the query heads that share a KV head are stacked as
extra query rows of that head, so each key and value is read once per KV head, not once per query head.

Only tensor shapes and host integers steer the loop, so it runs inside a CUDA graph as it is (the chunk
count is fixed by the batch shape) and needs no compilation. FlexAttention with a paged block mask was
measured as the alternative on CPU and was no faster at this engine's block size (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk sizing: the looked-up keys (and values) of one chunk, over all rows, and its fp32 score matrix stay
# within these bytes, so a chunk is read while it is still in cache and a long prefill chunk does not
# allocate a (queries x context) score matrix.
CHUNK_KV_BYTES = 1 << 20
CHUNK_SCORE_BYTES = 4 << 20


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    positions: torch.Tensor, visible: int = 0, chunk_blocks: int | None = None) -> torch.Tensor:
    """Causal attention of q over each row's cached context.

    q: (B, T, heads, hd); k_pool, v_pool: (num_blocks, block_size, kv_heads, hd) one layer's pool;
    block_table: (B, W) int64, row b's blocks in order (padded with any valid block id);
    positions: (B, T) absolute position of each query. Key j of row b is visible to a query at position p
    iff j <= p, so a row never reads past its context and padded table entries are never seen.
    visible: keys at positions below it are visible to every query (the smallest cached length in the
    batch, known on the host), so chunks entirely below it skip the mask.
    chunk_blocks: block-table columns per chunk (default: sized by CHUNK_KV_BYTES and CHUNK_SCORE_BYTES).
    Returns (B, T, heads, hd) in q's dtype; scores and sums are accumulated in fp32.
    """
    b, t, n_heads, hd = q.shape
    num_blocks, block_size, n_kv, _ = k_pool.shape
    group = n_heads // n_kv
    width = block_table.shape[1]
    rows = group * t  # query rows per KV head: row g * t + i is query i of the g-th head sharing this KV head
    per_block = b * block_size * n_kv * hd * k_pool.element_size()
    per_key = b * n_heads * t * 4
    chunk = chunk_blocks or max(1, min(CHUNK_KV_BYTES // per_block, CHUNK_SCORE_BYTES // (per_key * block_size)))

    # (B, T, kv, group, hd) -> (B, kv, group * T, hd): the heads of one group become query rows.
    qf = q.reshape(b, t, n_kv, group, hd).permute(0, 2, 3, 1, 4).reshape(b, n_kv, rows, hd)
    qf = qf.float() * hd ** -0.5
    query_pos = positions.repeat(1, group)[:, None, :, None]  # (B, 1, rows, 1), same row order as qf
    k_flat, v_flat = k_pool.view(num_blocks, -1), v_pool.view(num_blocks, -1)

    m = total = acc = None
    for c in range(0, width, chunk):
        blocks = block_table[:, c:c + chunk]
        n_keys = blocks.shape[1] * block_size
        # An embedding lookup of whole blocks: faster on CPU than advanced indexing (bench/RESULTS.md).
        keys = F.embedding(blocks, k_flat).view(b, n_keys, n_kv, hd).float().permute(0, 2, 3, 1)
        values = F.embedding(blocks, v_flat).view(b, n_keys, n_kv, hd).float().transpose(1, 2)
        scores = qf @ keys  # (B, kv, rows, n_keys)
        if (c + chunk) * block_size > visible:
            key_pos = torch.arange(c * block_size, c * block_size + n_keys, device=q.device)
            scores.masked_fill_(key_pos > query_pos, float("-inf"))
        chunk_max = scores.amax(-1, keepdim=True)
        if m is None:
            # The first chunk holds key 0, visible to every query: the running max is finite from here on,
            # so a later chunk that a row sees none of contributes exp(-inf) = 0.
            m = chunk_max
            p = torch.exp(scores - m)
            total, acc = p.sum(-1, keepdim=True), p @ values
        else:
            new_m = torch.maximum(m, chunk_max)
            rescale = torch.exp(m - new_m)
            p = torch.exp(scores - new_m)
            total = total * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ values
            m = new_m
    out = (acc / total).view(b, n_kv, group, t, hd).permute(0, 3, 1, 2, 4)
    return out.reshape(b, t, n_heads, hd).to(q.dtype)
