"""Attention over a paged KV pool, read through the block table a few blocks at a time.

Each step walks the block-table columns in chunks: it looks up one chunk of every row's blocks (a
cache-sized piece, never the whole context), attends the queries over it, and merges the chunks' results
exactly (softmax over the union of the chunks). The result equals softmax attention over each row's whole
context, without the dense (B, S, kv_heads, head_dim) copy of every row that a gather followed by one
attention call makes. Two ways to attend one chunk and merge:
- fused (CPU default): PyTorch's fused CPU attention kernel, which also returns each query's log-sum-exp;
  chunk outputs are merged by their log-sum-exps;
- matmul (other devices): the online softmax of flash attention with plain matmuls (a running max, sum of
  exponentials and weighted sum of values, rescaled whenever the max grows).
A context that fits in one chunk is looked up at once and attended by one SDPA call (on an accelerator,
where chunks are large, that is most batches: a paged GPU kernel is not part of this module).

Soft-capped scores (Gemma 2: cap * tanh(scores / cap)) have no fused kernel: with a cap every chunk goes the
matmul way, which caps each chunk's scores before its online-softmax merge, and a one-chunk context is attended
by models/softcap.py's explicit-score attention.

Grouped-query attention is folded into the query rows: the query heads that share a KV head are stacked
as extra queries of that head, so each key and value is read once per KV head, not once per query head.

Only tensor shapes and host integers steer the loop, so it runs inside a CUDA graph as it is (the chunk
count is fixed by the batch shape) and needs no compilation. FlexAttention with a paged block mask was
measured as the alternative on CPU: no faster at its best, and compiled per step shape (bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cybertron.models.softcap import capped_attention

# Chunk sizing on CPU: the looked-up keys (and values) of one chunk, over all rows, and its fp32 score matrix
# stay within these bytes, so a chunk is read while it is still in cache and a long prefill chunk does not
# allocate a (queries x context) score matrix.
CHUNK_KV_BYTES = 1 << 20
CHUNK_SCORE_BYTES = 4 << 20
# The fused kernel never holds a score matrix, and with many queries (a prefill chunk over cached context) each
# chunk's merge rewrites an output as large as the queries: chunks then span at least this many keys.
FUSED_MIN_CHUNK_KEYS = 2048
# On an accelerator each chunk costs a dozen kernel launches and its memory is not a CPU cache: chunks are
# large, so most batches take the one-chunk path (one lookup, one fused SDPA kernel).
ACCELERATOR_CHUNK_BYTES = 256 << 20


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                    positions: torch.Tensor, visible: int = 0, chunk_blocks: int | None = None,
                    fused: bool | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal attention of q over each row's cached context.

    q: (B, T, heads, hd); k_pool, v_pool: (num_blocks, block_size, kv_heads, hd) one layer's pool;
    block_table: (B, W) int64, row b's blocks in order (padded with any valid block id);
    positions: (B, T) absolute position of each query. Key j of row b is visible to a query at position p
    iff j <= p, so a row never reads past its context and padded table entries are never seen.
    visible: keys at positions below it are visible to every query (the smallest cached length in the
    batch, known on the host), so chunks entirely below it skip the mask.
    chunk_blocks: block-table columns per chunk (default: sized by the budgets above).
    fused: each chunk through PyTorch's fused CPU attention kernel (default on CPU), else through matmuls.
    softcap: scores capped at cap * tanh(scores / cap) before the softmax (then always through matmuls).
    Returns (B, T, heads, hd) in q's dtype; scores and sums are accumulated in fp32.
    """
    b, t, n_heads, hd = q.shape
    num_blocks, block_size, n_kv, _ = k_pool.shape
    group = n_heads // n_kv
    rows = group * t  # query rows per KV head: row g * t + i is query i of the g-th head sharing this KV head
    on_cpu = q.device.type == "cpu"
    kv_bytes = CHUNK_KV_BYTES if on_cpu else ACCELERATOR_CHUNK_BYTES
    score_bytes = CHUNK_SCORE_BYTES if on_cpu else ACCELERATOR_CHUNK_BYTES
    per_block = b * block_size * n_kv * hd * k_pool.element_size()
    per_block_scores = b * n_heads * t * block_size * 4
    fused = (on_cpu if fused is None else fused) and softcap is None
    if fused:
        chunk = max(1, kv_bytes // per_block, FUSED_MIN_CHUNK_KEYS // block_size if t > 1 else 1)
    else:
        chunk = max(1, min(kv_bytes // per_block, score_bytes // per_block_scores))
    chunk = chunk_blocks or chunk
    if chunk >= block_table.shape[1]:
        return _one_chunk(q, k_pool, v_pool, block_table, positions, softcap)

    # (B, T, kv, group, hd) -> (B, kv, group * T, hd): the heads of one group become query rows.
    qg = q.reshape(b, t, n_kv, group, hd).permute(0, 2, 3, 1, 4).reshape(b, n_kv, rows, hd)
    query_pos = positions.repeat(1, group)[:, None, :, None]  # (B, 1, rows, 1), same row order as qg
    k_flat, v_flat = k_pool.view(num_blocks, -1), v_pool.view(num_blocks, -1)
    shape = (block_size, n_kv, hd)
    if fused:
        out = _fused_chunks(qg, k_flat, v_flat, block_table, query_pos, visible, chunk, shape)
    else:
        out = _matmul_chunks(qg, k_flat, v_flat, block_table, query_pos, visible, chunk, shape, softcap)
    out = out.view(b, n_kv, group, t, hd).permute(0, 3, 1, 2, 4)
    return out.reshape(b, t, n_heads, hd).to(q.dtype)


def _one_chunk(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
               positions: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """The whole context fits in one cache-sized chunk: look it up at once and run one attention call,
    which saves the merge's extra kernels on short contexts."""
    num_blocks, block_size, n_kv, hd = k_pool.shape
    b, width = block_table.shape
    keys = F.embedding(block_table, k_pool.view(num_blocks, -1)).view(b, width * block_size, n_kv, hd)
    values = F.embedding(block_table, v_pool.view(num_blocks, -1)).view(b, width * block_size, n_kv, hd)
    mask = torch.arange(width * block_size, device=q.device) <= positions[:, None, :, None]  # (B, 1, T, S)
    if softcap is not None:
        return capped_attention(q, keys, values, mask, softcap)
    gqa = q.shape[2] != n_kv
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def _chunks(k_flat: torch.Tensor, v_flat: torch.Tensor, block_table: torch.Tensor, chunk: int,
            shape: tuple[int, int, int]):
    """(first key position, keys, values) per chunk of block-table columns, keys and values as
    (B, kv, n_keys, hd). An embedding lookup of whole blocks: faster on CPU than advanced indexing
    (bench/RESULTS.md)."""
    block_size, n_kv, hd = shape
    b = block_table.shape[0]
    for c in range(0, block_table.shape[1], chunk):
        blocks = block_table[:, c:c + chunk]
        n_keys = blocks.shape[1] * block_size
        keys = F.embedding(blocks, k_flat).view(b, n_keys, n_kv, hd).transpose(1, 2)
        values = F.embedding(blocks, v_flat).view(b, n_keys, n_kv, hd).transpose(1, 2)
        yield c * block_size, keys, values


def _fused_chunks(qg, k_flat, v_flat, block_table, query_pos, visible, chunk, shape) -> torch.Tensor:
    """Each chunk through the fused CPU kernel, which also returns its log-sum-exp per query; chunks are
    merged by their log-sum-exps (out = sum_c exp(lse_c - lse) out_c, lse = logaddexp over chunks)."""
    out = lse = None
    for first, keys, values in _chunks(k_flat, v_flat, block_table, chunk, shape):
        n_keys = keys.shape[2]
        mask = None
        if first + n_keys > visible:
            key_pos = torch.arange(first, first + n_keys, device=qg.device)
            mask = torch.zeros((), dtype=qg.dtype, device=qg.device).masked_fill(
                key_pos > query_pos, float("-inf"))
        out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, keys, values, 0.0, False, attn_mask=mask)
        lse_c = lse_c[..., None]
        if out is None:
            # The first chunk holds key 0, visible to every query: its log-sum-exp is finite everywhere.
            out, lse = out_c.float(), lse_c
            continue
        if mask is not None:
            # A query that sees none of this chunk gets output 0 and log-sum-exp 0 from the kernel: weight 0.
            lse_c = lse_c.masked_fill(query_pos < first, float("-inf"))
        new_lse = torch.logaddexp(lse, lse_c)
        out = out * torch.exp(lse - new_lse) + out_c.float() * torch.exp(lse_c - new_lse)
        lse = new_lse
    return out


def _matmul_chunks(qg, k_flat, v_flat, block_table, query_pos, visible, chunk, shape,
                   softcap: float | None = None) -> torch.Tensor:
    """The online softmax with plain matmuls (any device): a running max, sum of exponentials and
    weighted sum of values, rescaled whenever the max grows. A soft cap applies to each chunk's scores."""
    qf = qg.float() * shape[2] ** -0.5
    m = total = acc = None
    for first, keys, values in _chunks(k_flat, v_flat, block_table, chunk, shape):
        scores = qf @ keys.float().transpose(2, 3)  # (B, kv, rows, n_keys)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if first + scores.shape[-1] > visible:
            key_pos = torch.arange(first, first + scores.shape[-1], device=qg.device)
            scores.masked_fill_(key_pos > query_pos, float("-inf"))
        chunk_max = scores.amax(-1, keepdim=True)
        if m is None:
            # The first chunk holds key 0, visible to every query: the running max is finite from here on,
            # so a later chunk that a row sees none of contributes exp(-inf) = 0.
            m = chunk_max
            p = torch.exp(scores - m)
            total, acc = p.sum(-1, keepdim=True), p @ values.float()
        else:
            new_m = torch.maximum(m, chunk_max)
            rescale = torch.exp(m - new_m)
            p = torch.exp(scores - new_m)
            total = total * rescale + p.sum(-1, keepdim=True)
            acc = acc * rescale + p @ values.float()
            m = new_m
    return acc / total
