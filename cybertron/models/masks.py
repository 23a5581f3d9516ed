"""Attention patterns without a dense (B, 1, T, T) mask: causal, within packed documents, within a window.

A packed row holds several documents; a document starts wherever the position restarts at 0 (or drops).
A dense boolean mask of that pattern costs B * T * T bytes (64 MiB per row at 8k) and SDPA's masked path
materialises T x T scores besides. Here the pattern is kept as document boundaries, and attention runs
per document with SDPA's causal kernel (memory linear in T on CPU, where FlexAttention has no backward),
so cost follows the documents, not the row.

Runs of one-token documents (the padding of an SFT batch: positions all 0) are answered in one step: a query
that sees only its own key returns its own value, exactly.

A sliding window (Mistral, Qwen2, Gemma local layers) keeps key j visible to query i iff i - window < j <= i,
as transformers does; a document longer than its window is attended in query chunks of `window` rows, each
over the keys it can reach, so memory stays linear in T as well.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

# (start, end, singletons): a document [start, end), or with singletons a run of one-token documents.
Segment = tuple[int, int, bool]


@dataclass(frozen=True)
class AttentionMask:
    """What each query may see. segments None: one causal document per row (no packing)."""

    segments: tuple[tuple[Segment, ...], ...] | None = None
    window: int | None = None

    @classmethod
    def from_positions(cls, positions: torch.Tensor, window: int | None = None) -> AttentionMask:
        """Document boundaries from (B, T) positions (one host sync, shared by every layer)."""
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
        t = positions.shape[1]
        rows = []
        for row in starts.cpu().tolist():
            bounds = [i for i, s in enumerate(row) if s] + [t]
            segments: list[Segment] = []
            for a, b in zip(bounds, bounds[1:]):
                if b - a == 1 and segments and segments[-1][2] and segments[-1][1] == a:
                    segments[-1] = (segments[-1][0], b, True)  # extend a run of one-token documents
                else:
                    segments.append((a, b, b - a == 1))
            rows.append(tuple(segments))
        return cls(segments=tuple(rows), window=window)

    def with_window(self, window: int | None) -> AttentionMask:
        return replace(self, window=window)

    def dense(self, t: int, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 1, T, T) bool: the same pattern as a dense mask (a reference for tests and benchmarks)."""
        i = torch.arange(t, device=device)
        allowed = i[:, None] >= i[None, :]
        if self.window is not None:
            allowed = allowed & (i[:, None] - i[None, :] < self.window)
        if self.segments is None:
            return allowed.expand(batch, 1, t, t)
        doc = torch.empty(len(self.segments), t, dtype=torch.int64, device=device)
        for r, segments in enumerate(self.segments):
            for n, (a, b, singles) in enumerate(segments):
                doc[r, a:b] = torch.arange(a, b, device=device) + t if singles else n
        return (allowed & (doc[:, :, None] == doc[:, None, :]))[:, None]


def dense_attention_mask(positions: torch.Tensor | None, window: int | None, t: int,
                         device: torch.device | str) -> torch.Tensor:
    """(B or 1, 1, T, T) bool from tensor ops alone (no host sync): what a compiled forward uses. A document
    starts wherever the position restarts at 0 (or drops), so packed examples never see each other."""
    i = torch.arange(t, device=device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    if positions is None:
        return allowed[None, None]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] <= positions[:, :-1]
    doc = starts.cumsum(dim=1)
    return (allowed & (doc[:, :, None] == doc[:, None, :]))[:, None]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Attention over (B, T, heads, hd) tensors under `mask`; returns (B, T, heads, hd)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
    if mask.segments is None:
        return _causal(q, k, v, mask.window).transpose(1, 2)
    rows = []
    for r, segments in enumerate(mask.segments):
        pieces = []
        for a, b, singles in segments:
            qs, ks, vs = q[r:r + 1, :, a:b], k[r:r + 1, :, a:b], v[r:r + 1, :, a:b]
            pieces.append(_own_value(vs, q.shape[1]) if singles else _causal(qs, ks, vs, mask.window))
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows).transpose(1, 2)


def _own_value(v: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Softmax over a single key is 1: each query gets its own value (kv heads repeated for GQA).
    return v.repeat_interleave(n_heads // v.shape[1], dim=1) if v.shape[1] != n_heads else v


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, nh, L, hd) causal attention, within `window` keys when given."""
    gqa = q.shape[1] != k.shape[1]
    length = q.shape[2]
    if window is None or length <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Query chunk [c, c + window) reaches keys [c - window + 1, c + window): a band mask of that block.
    pieces = []
    for c in range(0, length, window):
        e, lo = min(c + window, length), max(0, c - window + 1)
        qi = torch.arange(c, e, device=q.device)[:, None]
        kj = torch.arange(lo, e, device=q.device)[None, :]
        band = (kj <= qi) & (qi - kj < window)
        pieces.append(F.scaled_dot_product_attention(q[:, :, c:e], k[:, :, lo:e], v[:, :, lo:e],
                                                     attn_mask=band, enable_gqa=gqa))
    return torch.cat(pieces, dim=2)


def window_visible_keys(positions: torch.Tensor, s: int, window: int) -> torch.Tensor:
    """(B, 1, T, S) bool for a cache of S key slots in position order: key j is visible to a query at
    position p iff p - window < j <= p (what a paged cache's sliding layer attends; serve/cache.py)."""
    key_pos = torch.arange(s, device=positions.device)[None, None, :]
    p = positions[:, :, None]
    return ((key_pos <= p) & (key_pos > p - window))[:, None]
