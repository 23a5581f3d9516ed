"""Per-request sampling parameters and a batched sampler that applies each row's own parameters.

Reproducibility: every request owns a `torch.Generator`, and a sampled row consumes exactly one uniform
number from it per token. What a request draws therefore depends on its seed alone, never on which other
requests share the batch.

Log-probabilities are those of the *model's* distribution: `log_softmax` of the raw fp32 logits, before
temperature, top-k or top-p. That is the quantity a trainer computes from the same logits (policy-gradient
and KL terms in GRPO/PPO need exactly it), and it does not change when a client changes how it samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cybertron.errors import UserError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit: more would make every streamed chunk large


class InvalidParameter(UserError):
    """A sampling or request parameter is out of range; `param` names it (the HTTP error body reports it)."""

    def __init__(self, param: str, message: str, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 mean off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0  # also return the n most likely tokens (model distribution) at each step
    ignore_eos: bool = False  # keep going past the end-of-text token (benchmarks need fixed lengths)
    stop_token_ids: tuple[int, ...] = field(default=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """InvalidParameter naming the first value out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter("temperature", f"temperature must be a finite number >= 0 (0 = greedy), "
                                                  f"got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParameter("top_k", f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidParameter("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, "
                                                   f"got {self.top_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidParameter("stop", "stop strings must be non-empty strings")


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The request's own random stream; an unseeded request draws a fresh nondeterministic seed."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]  # of the chosen tokens, under the model's distribution
    top_logprobs: list[list[tuple[int, float]]]  # per row, best first; empty where not asked for


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> SampleOutput:
    """One token per row of `logits` (B, vocab), each row with its own parameters and generator.
    Everything stays on the device until one transfer of the results at the end."""
    logits = logits.float()
    model_logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        rows = torch.tensor(sampled, device=logits.device)
        drawn = _sample_rows(logits[rows], [params[i] for i in sampled], [generators[i] for i in sampled])
        tokens = tokens.index_copy(0, rows, drawn)
    chosen = model_logprobs.gather(1, tokens[:, None])[:, 0]
    k = max(p.top_logprobs for p in params)
    top = torch.topk(model_logprobs, k, dim=-1) if k else None
    # The single device -> host transfer of the step.
    host_tokens, host_logprobs = tokens.tolist(), chosen.tolist()
    top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
    top_lists = [list(zip(top_ids[i][:p.top_logprobs], top_values[i][:p.top_logprobs])) if p.top_logprobs
                 else [] for i, p in enumerate(params)]
    return SampleOutput(host_tokens, host_logprobs, top_lists)


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (on the tempered distribution, as vLLM and HF do), then inverse
    transform sampling with one uniform per row from that row's generator."""
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    values, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    rank = torch.arange(vocab, device=device)
    # A token survives top-p if the mass strictly before it is below top_p: the smallest set reaching
    # top_p is kept, and the most likely token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])
    probs = probs * keep
    cdf = probs.cumsum(dim=-1)
    uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])
    # First rank whose cdf exceeds u * total: a token with zero mass (filtered out) can never be picked.
    pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)  # rounding at the very top of the cdf
    return order.gather(1, pick)[:, 0]
