"""Decode steps with static shapes, replayed as CUDA graphs.

At small batch a decode step is hundreds of tiny kernels, and launching them, not the GPU, sets the pace.
A CUDA graph replays the whole step with one launch. Graphs need fixed shapes and fixed device addresses,
so a decode batch is padded up to a bucket of rows, and each row's block table up to a bucket width
(padded rows and table entries point at the scratch block). All inputs travel in one static int64 buffer,
copied from pinned host memory in one transfer: column 0 the token, 1 its position, 2 the pool row its
k/v go to, then with LoRA adapters loaded the row's adapter slot (serve/multi_lora.py), then the block
table. Nothing in the step reads a device value back on the host.

Each (rows, width) bucket is captured on first use, and all graphs share one memory pool. With
capture=False the very same static path runs eagerly: that is how CPU tests check the padding logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cybertron.models.llama import Transformer
from cybertron.serve.cache import SCRATCH_BLOCK, CacheBatch, PagedKVCache, visible_keys
from cybertron.serve.multi_lora import MultiLoRA

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _Bucket:
    host: torch.Tensor  # (rows, 3 + width) int64 staging buffer (pinned when capturing)
    inputs: torch.Tensor  # the device buffer the graph reads
    logits: torch.Tensor | None  # the graph's output buffer (B rows of it are valid after a replay)
    graph: torch.cuda.CUDAGraph | None


class DecodeGraphs:
    """`graphs(seq_ids, tokens, positions)` -> (B, vocab) fp32 logits of one decode step."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch_size: int, capture: bool,
                 lora: MultiLoRA | None = None):
        self.model, self.cache, self.capture = model, cache, capture
        self.lora = lora  # multi-LoRA: each row's adapter slot is one more static input column
        self.table_col = 3 + (lora is not None)
        max_width = cache.blocks_for(model.config.max_seq_len)
        self.row_buckets = [b for b in ROW_BUCKETS if b < max_batch_size] + [max_batch_size]
        # Powers of two: a row reads at most twice the blocks it needs, and there are only log2(context)
        # widths to capture.
        self.width_buckets = sorted({min(2**i, max_width) for i in range(max_width.bit_length() + 1)})
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, seq_ids: list[int], tokens: list[int], positions: list[int],
                 adapters: list[int] | None = None) -> torch.Tensor:
        bs = self.cache.block_size
        tables = [self.cache.tables[s][:p // bs + 1] for s, p in zip(seq_ids, positions)]
        rows = _smallest_at_least(self.row_buckets, len(tokens))
        width = _smallest_at_least(self.width_buckets, max(len(t) for t in tables))
        bucket = self._buckets.get((rows, width)) or self._build(rows, width)
        slots = [[a] for a in adapters or [0] * len(tokens)] if self.lora is not None else [[]] * len(tokens)
        data = [[tok, p, table[p // bs] * bs + p % bs, *slot, *table, *[SCRATCH_BLOCK] * (width - len(table))]
                for tok, p, table, slot in zip(tokens, positions, tables, slots)]
        data += [[0] * (self.table_col + width)] * (rows - len(data))  # token 0 at position 0 in the scratch block
        bucket.host.copy_(torch.tensor(data, dtype=torch.int64))
        if bucket.graph is None:
            return self._step(bucket.inputs, width)[:len(tokens)]
        # The host buffer is rewritten next step only after the step's results were read back, which
        # waits for this copy too.
        bucket.inputs.copy_(bucket.host, non_blocking=True)
        bucket.graph.replay()
        return bucket.logits[:len(tokens)]

    def _step(self, inputs: torch.Tensor, width: int) -> torch.Tensor:
        """The captured computation: a decode forward driven only by device tensors."""
        positions = inputs[:, 1:2]
        if self.lora is not None:  # base rows (slot 0) add exactly zero, so one graph serves every mix
            self.lora.bind(inputs[:, 3])
        batch_class = getattr(self.cache, "batch_class", CacheBatch)  # a latent cache's (serve/latent_cache.py)
        batch = batch_class(cache=self.cache, positions=positions, slots=inputs[:, 2],
                           block_table=inputs[:, self.table_col:],
                           context_lens=positions[:, 0] + 1, fresh=False, span=None,
                           mask=visible_keys(positions, width * self.cache.block_size))
        return self.model(inputs[:, :1], positions=positions, cache=batch)[:, 0].float()

    def _build(self, rows: int, width: int) -> _Bucket:
        host = torch.zeros(rows, self.table_col + width, dtype=torch.int64, pin_memory=self.capture)
        if not self.capture:
            bucket = _Bucket(host, host, None, None)
        else:
            bucket = self._capture(host, width)
        self._buckets[(rows, width)] = bucket
        return bucket

    def _capture(self, host: torch.Tensor, width: int) -> _Bucket:
        inputs = torch.zeros_like(host, device=self.cache.device)  # all rows padding: writes hit scratch only
        # Warm up on a side stream first (lazy initialisation, workspaces), as torch.cuda.graphs asks.
        stream = torch.cuda.Stream(self.cache.device)
        stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(inputs, width)
        torch.cuda.current_stream(self.cache.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._step(inputs, width)
        return _Bucket(host, inputs, logits, graph)


def _smallest_at_least(buckets: list[int], n: int) -> int:
    return next(b for b in buckets if b >= n)
