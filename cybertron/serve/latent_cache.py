"""Paged cache for multi-head latent attention (models/mla.py): one pool row per token holds the compressed
latent and the shared rope key (kv_lora_rank + qk_rope_head_dim values, one "head"), not per-head keys and
values: DeepSeek-V3's cache is this small.

It reuses PagedKVCache's blocks, allocator and tables and CacheBatch's per-step indices as they are; only the
pool and the attention differ. The `k` pool holds the latent rows and `v` is an empty view (nothing to
store), so what zeroes both pools (clear, the block manager) works unchanged. Attention runs in latent space
(the "absorbed" form, see models/mla.py): the model hands over queries already projected into it, and the
cached latent serves as key and as value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cybertron.models.config import ModelConfig
from cybertron.serve.cache import CacheBatch, PagedKVCache, _gather, visible_keys


def latent_width(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def latent_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.n_layers * block_size * latent_width(cfg) * itemsize


class LatentKVCache(PagedKVCache):
    batch_class: type[CacheBatch]  # set below: what decode graphs build their static batch as

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__(cfg.n_layers, 1, 0, num_blocks, block_size, dtype, device)  # empty k and v pools
        self.k = torch.zeros((cfg.n_layers, 1 + num_blocks, block_size, 1, latent_width(cfg)), dtype=dtype,
                             device=self.device)

    def batch(self, seq_ids: Sequence[int], starts: Sequence[int], num_new: Sequence[int],
              rope_lengths: Sequence[int] | None = None) -> LatentCacheBatch:
        return LatentCacheBatch.build(self, seq_ids, starts, num_new, rope_lengths)


class LatentCacheBatch(CacheBatch):
    """CacheBatch's indices (built as it builds them; decode graphs fill them from device buffers), plus
    attention over the latent pool."""

    def attend_latent(self, layer_idx: int, q: torch.Tensor, entry: torch.Tensor, value_dim: int,
                      scale: float) -> torch.Tensor:
        """Write this step's entries (B, T, 1, width) into the pool, then attend q (B, T, heads, width) over each
        row's whole cached context, values being the entries' first value_dim columns: (B, T, heads, value_dim)."""
        b, t, _, width = entry.shape
        pool = self.cache.k[layer_idx].view(-1, 1, width)
        pool.index_copy_(0, self.slots, entry.reshape(b * t, 1, width))
        if self.fresh:  # prefill from position 0: the context is the new tokens, causally
            return _latent_sdpa(q, entry, value_dim, scale, None, causal=True)
        if self.span is not None:  # one sequence in consecutive blocks: a view, no gather, no mask
            first, length = self.span
            return _latent_sdpa(q, pool[first:first + length][None], value_dim, scale, None, causal=False)
        # Always the gather path (each row's blocks copied into one tensor), whatever cache.attention says:
        # values are a slice of the keys here, which the paged kernel's separate k/v pools do not express.
        keys = _gather(self.cache.k[layer_idx], self.block_table)  # (B, S, 1, width)
        mask = self.mask if self.mask is not None else visible_keys(self.positions, keys.shape[1])
        return _latent_sdpa(q, keys, value_dim, scale, mask, causal=False)


def _latent_sdpa(q: torch.Tensor, keys: torch.Tensor, value_dim: int, scale: float, mask: torch.Tensor | None,
                 causal: bool) -> torch.Tensor:
    q, keys = q.transpose(1, 2), keys.transpose(1, 2)  # (B, heads, T, width), (B, 1, S, width)
    keys = keys.expand(-1, q.shape[1], -1, -1)  # every head reads the one latent
    out = F.scaled_dot_product_attention(q, keys, keys[..., :value_dim], attn_mask=mask, is_causal=causal,
                                         scale=scale)
    return out.transpose(1, 2)


LatentKVCache.batch_class = LatentCacheBatch
