"""Losses as pure functions. Each returns a *sum* over its units (tokens, pairs) so the trainer can divide
by the true global count: that is what makes gradient accumulation and data parallelism exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Summed token cross-entropy in fp32 over positions whose label is not IGNORE_INDEX.

    Computed in chunks of rows so fp32 copies of a large-vocabulary logits tensor are never all alive."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    if logits.shape[0] <= chunk_tokens:  # one chunk: no split, whose backward would copy the gradient
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    total = logits.new_zeros((), dtype=torch.float32)
    # split, not slicing: split's backward concatenates the chunk gradients, while each slice's backward
    # would zero-fill a gradient the size of all logits (a visible share of a tiny-model step on CPU).
    for chunk, chunk_labels in zip(logits.split(chunk_tokens), labels.split(chunk_tokens)):
        total = total + F.cross_entropy(chunk.float(), chunk_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits (same leading shape), in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """(B, T-1) fp32 log p(ids[:, t+1] | ids[:, :t+1]) from logits (B, T, V) of the sequence ids (B, T).

    Through cross_entropy (a fused log-softmax + gather) in chunks of rows, so only a few rows' fp32
    log-probabilities over the vocabulary exist at once."""
    targets = ids[:, 1:]
    logits = logits[:, :-1]
    parts = []
    for chunk, chunk_targets in zip(logits.split(chunk_rows), targets.split(chunk_rows)):
        flat = chunk.reshape(-1, chunk.shape[-1]).float()
        parts.append(-F.cross_entropy(flat, chunk_targets.reshape(-1), reduction="none").view(chunk_targets.shape))
    return torch.cat(parts)
