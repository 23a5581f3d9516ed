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
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk_tokens):
        chunk = logits[start:start + chunk_tokens].float()
        total = total + F.cross_entropy(chunk, labels[start:start + chunk_tokens], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under logits (same leading shape), in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
