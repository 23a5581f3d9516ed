"""The model runner: turns a scheduled step's rows into CacheBatch views and model calls.

Prefill rows are chunks that start at their sequence's cached length (a prefix-cache hit or earlier chunks),
so CacheBatch(starts > 0) attends each chunk over the context already in the pool. Decode rows go through
the decode graphs (decode_graphs.py) when enabled, else through the same model call eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cybertron.models.llama import Transformer
from cybertron.serve.cache import PagedKVCache
from cybertron.serve.decode_graphs import DecodeGraphs
from cybertron.serve.multi_lora import MultiLoRA


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, device: torch.device,
                 decode_graphs: DecodeGraphs | None, max_attention_keys: int, lora: MultiLoRA | None = None):
        self.model, self.cache, self.device = model, cache, device
        self.decode_graphs = decode_graphs
        self.max_attention_keys = max_attention_keys
        self.lora = lora  # multi-LoRA: each call's rows name their adapter slots (`adapters`)

    def prefill(self, seq_ids: Sequence[int], starts: Sequence[int], chunks: Sequence[Sequence[int]],
                adapters: Sequence[int] | None = None, seq_lens: Sequence[int] | None = None) -> torch.Tensor:
        """(B, vocab) logits at the last token of each row's chunk; chunks right-padded into one batch.
        seq_lens: each row's whole length (its prompt's), what length-dependent RoPE takes its angles from."""
        if self.lora is not None:
            self.lora.select(adapters)
        lengths = [len(chunk) for chunk in chunks]
        width = max(lengths)
        tokens = torch.tensor([list(chunk) + [0] * (width - n) for chunk, n in zip(chunks, lengths)])
        last = torch.tensor(lengths).to(self.device, non_blocking=True) - 1
        batch = self.cache.batch(list(seq_ids), list(starts), lengths, seq_lens)
        # The output head on each chunk's last position only (logits_at), through the model's own call.
        return self.model(tokens.to(self.device, non_blocking=True), positions=batch.positions, cache=batch,
                          logits_at=last)

    def decode(self, seq_ids: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               adapters: Sequence[int] | None = None) -> torch.Tensor:
        """(B, vocab) logits of one new token per row (token at `position`), through the graphs if enabled."""
        ids, tokens, positions = list(seq_ids), list(tokens), list(positions)
        if self.decode_graphs is not None:
            return self.decode_graphs(ids, tokens, positions, None if adapters is None else list(adapters))
        if self.lora is not None:
            self.lora.select(adapters)
        batch = self.cache.batch(ids, positions, [1] * len(ids))
        inputs = torch.tensor(tokens)[:, None].to(self.device, non_blocking=True)
        return self.model(inputs, positions=batch.positions, cache=batch)[:, 0]

    def decode_groups(self, context_lens: Sequence[int]) -> list[list[int]]:
        """Row indices of decode batches of similar context lengths whose gathered keys (rows x longest
        context) stay within max_attention_keys: a few long sequences neither pad every short one nor
        exhaust memory."""
        groups: list[list[int]] = []
        longest = 0
        for i in sorted(range(len(context_lens)), key=lambda i: context_lens[i]):
            longest = max(longest, context_lens[i])
            if groups and (len(groups[-1]) + 1) * longest <= self.max_attention_keys:
                groups[-1].append(i)
            else:
                groups.append([i])
                longest = context_lens[i]
        return groups


def build_decode_graphs(model: Transformer, cache: PagedKVCache, max_batch_size: int,
                        enabled: bool | None, lora: MultiLoRA | None = None) -> DecodeGraphs | None:
    """CUDA graphs for decode by default on CUDA. enabled=True elsewhere runs the same static, padded
    path eagerly (how CPU tests cover it); False always decodes eagerly."""
    on_cuda = cache.device.type == "cuda"
    if not (on_cuda if enabled is None else enabled):
        return None
    return DecodeGraphs(model, cache, max_batch_size, capture=on_cuda, lora=lora)
