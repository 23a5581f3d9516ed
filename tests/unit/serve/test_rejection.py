"""The acceptance rule of speculative sampling: the filtered distribution is the sampler's, and keeping d with
probability min(1, p/q), else drawing from the residual, emits exactly p (checked in closed form)."""

import pytest
import torch

from cybertron.serve.rejection import accepted_count, filtered_probs, residual, sample_from
from cybertron.serve.sampling import SamplingBatch, SamplingParams, _sample_rows

GRID = 4000  # uniform numbers (i + 0.5) / GRID: each token is picked GRID * P(token) times, +-1


def _grid():
    return (torch.arange(GRID, dtype=torch.float32) + 0.5) / GRID


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
                                    SamplingParams(temperature=1.3, top_p=0.6),
                                    SamplingParams(temperature=0.5, top_k=4, top_p=0.9)])
def test_filtered_probs_is_what_the_sampler_draws_from(params):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 2
    rows = logits.expand(GRID, -1)
    batch = SamplingBatch(params=[params] * GRID, rows=torch.arange(GRID),
                          temperature=torch.full((GRID, 1), params.temperature),
                          top_k=torch.full((GRID, 1), params.top_k or 2**62, dtype=torch.int64),
                          top_p=torch.full((GRID, 1), params.top_p), uniform=_grid())
    drawn = torch.bincount(_sample_rows(rows, batch), minlength=12).float() / GRID
    probs = filtered_probs(logits[None], [params])[0]
    torch.testing.assert_close(drawn, probs, atol=2 / GRID, rtol=0)
    assert probs.sum().item() == pytest.approx(1.0)


def test_sample_from_is_inverse_transform_and_never_picks_a_zero():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.5, 0.2, 0.0])
    drawn = torch.bincount(sample_from(probs.expand(GRID, -1), _grid()), minlength=6).float() / GRID
    torch.testing.assert_close(drawn, probs, atol=2 / GRID, rtol=0)
    edge = sample_from(probs[None] * 3, torch.tensor([1.0 - 1e-9]))  # u * total rounds to the total
    assert edge.item() == 4


def _emitted(p, q, draft=None):
    """Closed form of what one verified position emits: d ~ q kept with min(1, p/q), else the residual."""
    if q is None:  # a point mass on `draft`
        kept = torch.zeros_like(p).index_fill(0, torch.tensor([draft]), p[draft].item())
        rest = residual(p, None, draft)
        return kept + (1 - p[draft]) * rest / rest.sum()
    keep = torch.where(q > 0, torch.minimum(torch.ones_like(p), p / q), torch.zeros_like(p))
    kept = q * keep
    rest = residual(p, q, 0)
    return kept + (1 - kept.sum()) * rest / rest.sum()


def test_acceptance_rule_emits_the_target_distribution_exactly():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        p = torch.softmax(torch.randn(7, generator=gen, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(7, generator=gen, dtype=torch.float64) * 2, 0)
        p[2], q[5] = 0.0, 0.0  # tokens only one of them can produce
        p, q = p / p.sum(), q / q.sum()
        torch.testing.assert_close(_emitted(p, q), p)
        torch.testing.assert_close(_emitted(p, None, draft=3), p)  # prompt lookup's deterministic proposal


def test_residual_of_a_draft_equal_to_the_target_falls_back_to_the_target():
    p = torch.tensor([0.25, 0.75])
    assert residual(p, p.clone(), 0).tolist() == p.tolist()
    assert residual(torch.tensor([0.0, 1.0]), None, 1).tolist() == [0.0, 1.0]


def test_accepted_count_keeps_each_draft_with_probability_min_1_ratio():
    gen = torch.Generator().manual_seed(2)
    assert accepted_count([1.0, 1.0, 3.0], gen) == 3
    assert accepted_count([0.0, 1.0], gen) == 0
    assert accepted_count([2.0, 0.0], gen) == 1
    counts = torch.bincount(torch.tensor([accepted_count([0.6, 0.5], gen) for _ in range(4000)]), minlength=3)
    expected = torch.tensor([0.4, 0.6 * 0.5, 0.6 * 0.5])  # rejected first, kept first only, both kept
    torch.testing.assert_close(counts.float() / 4000, expected, atol=0.03, rtol=0)
