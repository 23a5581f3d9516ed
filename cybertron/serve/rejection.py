"""The acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

Draft d_i, drawn from the proposal q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)), in order, until
the first rejection; a rejected position takes a token from the residual max(0, p_i - q_i), renormalised,
and when every draft is kept the target adds one token from p_{k+1}. Each emitted token is then distributed
exactly as p, the target's own sampling distribution: whatever q is, only speed depends on it. For a
deterministic proposal (prompt lookup, q_i a point mass) that is: keep d_i with probability p_i(d_i), else
draw from p_i with d_i removed.

p and q are the *filtered* distributions a request samples from (temperature, then top-k, then top-p),
computed exactly as sampling.py's sampler does, so a speculated request samples from what it would
sample from without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cybertron.serve.sampling import SamplingParams


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """(N, vocab) the distribution sampling.py's `_sample_rows` draws row i from under params[i]: the
    tempered softmax restricted to the top-k tokens and to the smallest set reaching top-p, renormalised."""
    temperature = torch.tensor([[p.temperature] for p in params], dtype=torch.float32, device=logits.device)
    top_k = torch.tensor([[p.top_k or 2**62] for p in params], dtype=torch.int64, device=logits.device)
    top_p = torch.tensor([[p.top_p] for p in params], dtype=torch.float32, device=logits.device)
    values, order = (logits.float() / temperature).sort(dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    mass_before = probs.cumsum(dim=-1) - probs  # as in the sampler: the top token always survives
    kept = probs * ((rank[None, :] < top_k) & (mass_before < top_p))
    kept = kept / kept.sum(dim=-1, keepdim=True)
    return torch.zeros_like(kept).scatter_(1, order, kept)


def sample_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """(N,) inverse-transform draws from the rows of `probs` (N, vocab; need not sum to 1) with one uniform
    number each. A zero-probability token is never picked: the cdf does not rise there."""
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    # u * total rounding up to the total would run past the end: take the last token with any mass.
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(pick, last)


def accepted_count(ratios: Sequence[float], generator: torch.Generator) -> int:
    """How many drafts are kept, given p_i(d_i) / q_i(d_i) for each: d_i survives with probability
    min(1, ratio), one uniform number each from the request's generator, until the first rejection."""
    for i, ratio in enumerate(ratios):
        if torch.rand(1, generator=generator).item() >= ratio:
            return i
    return len(ratios)


def residual(p: torch.Tensor, q: torch.Tensor | None, draft: int) -> torch.Tensor:
    """What a position whose draft was rejected samples from: max(0, p - q) (unnormalised); q None is the
    point mass on `draft`. Should rounding leave no mass at all (p equal to q), p itself."""
    if q is None:
        rest = p.index_fill(0, torch.tensor([draft], device=p.device), 0.0)
    else:
        rest = (p - q).clamp_min(0.0)
    return torch.where(rest.sum() > 0, rest, p)
