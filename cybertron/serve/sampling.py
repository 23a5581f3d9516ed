"""Per-request sampling parameters and a batched sampler that applies each row's own parameters.

Reproducibility: every request owns a `torch.Generator`, and a sampled row consumes exactly one uniform
number from it per token. What a request draws therefore depends on its seed alone, never on which other
requests share the batch.

Before a token is chosen (greedy or sampled), each row's logits get OpenAI's adjustments: its logit_bias
added, and `frequency_penalty * count[j] + presence_penalty * (count[j] > 0)` subtracted, where count is
how often token j occurs in what the request has generated so far (not the prompt). Temperature, top-k and
top-p then act on the adjusted logits.

Log-probabilities are those of the *model's* distribution: `log_softmax` of the raw fp32 logits, before
logit_bias, penalties, temperature, top-k or top-p. That is the quantity a trainer computes from the same
logits (policy-gradient and KL terms in GRPO/PPO need exactly it), it does not change when a client changes
how it samples, and it is what vLLM reports by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cybertron.errors import UserError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit: more would make every streamed chunk large
# Stop strings are searched in every request's text after every token (detokenize.py), at a cost that grows
# with their number and length: without a cap one request can slow everyone's step down. OpenAI allows 4.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512  # their total length
MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI documents; each becomes work in every step
LOGIT_BIAS_RANGE = 100.0  # |bias| at most, OpenAI's range: -100 bans a token in practice, +100 forces it
PENALTY_RANGE = 2.0  # |presence_penalty| and |frequency_penalty| at most, OpenAI's range
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts (a negative seed wraps around)
NON_FINITE_LOGITS = ("the model produced non-finite logits (NaN or inf) for this request, so no token can be "
                     "sampled; the checkpoint's weights are broken or the computation overflowed")


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
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids distinct
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    # Structured output: a compiled grammar (structured.Grammar) the tokens must follow; None = free text.
    grammar: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the request's generated tokens must be counted (a penalty is set)."""
        return bool(self.presence_penalty or self.frequency_penalty)

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
        if len(self.stop) > MAX_STOP_STRINGS or sum(map(len, self.stop)) > MAX_STOP_CHARS:
            raise InvalidParameter("stop", f"at most {MAX_STOP_STRINGS} stop strings of {MAX_STOP_CHARS} "
                                           f"characters in all, got {len(self.stop)} of "
                                           f"{sum(map(len, self.stop))}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise InvalidParameter("seed", f"seed must be in [-2**63, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE):
                raise InvalidParameter(name, f"{name} must be in [-2, 2], got {value}")
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        """Ranges only: whether the ids exist in the vocabulary is the engine's check (it knows the model)."""
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParameter("logit_bias", f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got "
                                                 f"{len(self.logit_bias)}")
        seen = set()
        for token, bias in self.logit_bias:
            if token < 0 or token in seen:
                raise InvalidParameter("logit_bias", f"logit_bias keys must be distinct token ids >= 0, got "
                                                     f"{token}" + (" twice" if token in seen else ""))
            if not (math.isfinite(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
                raise InvalidParameter("logit_bias", f"logit_bias values must be in [-100, 100], got {bias} for "
                                                     f"token {token}")
            seen.add(token)


def make_generator(seed: int | None) -> torch.Generator:
    """The request's own random stream, on the CPU whatever the model's device: a seed then gives the same
    draws on any machine, and drawing costs no device kernel. Unseeded requests get a fresh random seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


@dataclass
class TokenMask:
    """The tokens that constrained rows may choose (structured output, see structured.py): token j is allowed
    for row rows[k] if bit j % 32 of the int32 word bits[k, j // 32] is set."""

    rows: torch.Tensor  # (R,) int64
    bits: torch.Tensor  # (R, ceil(vocab / 32)) int32


def mask_logits(logits: torch.Tensor, mask: TokenMask | None) -> torch.Tensor:
    """(B, vocab) logits with every token a row's mask forbids at -inf (a new tensor)."""
    if mask is None:
        return logits
    one = torch.ones(32, dtype=torch.int32, device=logits.device)
    bit = one.bitwise_left_shift(torch.arange(32, dtype=torch.int32, device=logits.device))  # 1 << k, as int32
    forbidden = (mask.bits[:, :, None] & bit).flatten(1)[:, :logits.shape[-1]] == 0
    if mask.rows.shape[0] == logits.shape[0]:  # every row constrained (rows are 0..B-1 in order)
        return logits.masked_fill(forbidden, float("-inf"))
    return logits.index_put((mask.rows,), logits[mask.rows].masked_fill(forbidden, float("-inf")))


@dataclass
class SamplingBatch:
    """A step's sampling inputs, moved to the device *before* the forward is launched, so that nothing
    between the forward and the final read-back waits for the device."""

    params: list[SamplingParams]
    rows: torch.Tensor | None  # (S,) rows that sample (the others are greedy); None if all are greedy
    temperature: torch.Tensor | None  # (S, 1)
    top_k: torch.Tensor | None  # (S, 1); "off" is a k larger than any vocabulary
    top_p: torch.Tensor | None  # (S, 1)
    uniform: torch.Tensor | None  # (S,) one draw per sampled row from that request's generator
    # Sparse logit adjustments (logit_bias and penalties): entry e adds scale * count + shift to logit
    # [row, token]; None if no row has any.
    adjust_at: torch.Tensor | None = None  # (2, E) int64: rows, tokens
    adjust_terms: torch.Tensor | None = None  # (3, E) float32: scale, count, shift
    allowed: TokenMask | None = None  # structured output: set by the engine once the forward is launched

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str,
              counts: Sequence[dict[int, int] | None] | None = None) -> SamplingBatch:
        """`counts[i]`: how often each token occurs in row i's generated tokens (needed where penalized)."""
        adjust_at, adjust_terms = _adjustments(params, counts, device)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return cls(list(params), None, None, None, None, None, adjust_at, adjust_terms)
        uniform = torch.cat([torch.rand(1, generator=generators[i]) for i in sampled])
        columns = torch.tensor([[i, params[i].top_k or 2**62] for i in sampled], dtype=torch.int64)
        floats = torch.tensor([[params[i].temperature, params[i].top_p] for i in sampled], dtype=torch.float32)
        columns, floats, uniform = (t.to(device, non_blocking=True) for t in (columns, floats, uniform))
        return cls(list(params), columns[:, 0], floats[:, :1], columns[:, 1:], floats[:, 1:], uniform,
                   adjust_at, adjust_terms)


def _adjustments(params: Sequence[SamplingParams], counts: Sequence[dict[int, int] | None] | None,
                 device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The sparse entries of every row's logit_bias (scale 0, shift = bias) and penalties (scale
    -frequency_penalty, count, shift -presence_penalty, one entry per distinct generated token). The host
    only concatenates lists, without arithmetic per token; the device computes scale * count + shift."""
    rows: list[int] = []
    tokens: list[int] = []
    scale: list[float] = []
    count: list[float] = []
    shift: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            n = len(p.logit_bias)
            ids, biases = zip(*p.logit_bias)
            rows += [i] * n
            tokens += ids
            scale += [0.0] * n
            count += [0.0] * n
            shift += biases
        seen = counts[i] if counts is not None and p.penalized else None
        if seen:
            n = len(seen)
            rows += [i] * n
            tokens += seen.keys()
            scale += [-p.frequency_penalty] * n
            count += seen.values()
            shift += [-p.presence_penalty] * n
    if not rows:
        return None, None
    at = torch.tensor([rows, tokens], dtype=torch.int64).to(device, non_blocking=True)
    terms = torch.tensor([scale, count, shift], dtype=torch.float32).to(device, non_blocking=True)
    return at, terms


def adjust_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """(B, vocab) logits with the batch's logit_bias and penalties applied (a new tensor; several entries
    on one token add up, a bias and a penalty on the same token both count)."""
    if batch.adjust_at is None:
        return logits
    scale, count, shift = batch.adjust_terms
    return logits.index_put((batch.adjust_at[0], batch.adjust_at[1]), scale * count + shift, accumulate=True)


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]  # of the chosen tokens, under the model's distribution
    top_logprobs: list[list[tuple[int, float]]]  # per row, best first; empty where not asked for
    finite: list[bool]  # False: the row's logits had no distribution (its token is meaningless)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleOutput:
    """One token per row of `logits` (B, vocab), each row with its own parameters and random stream.
    Everything stays on the device until one transfer of all results at the end (one sync per step)."""
    logits = logits.float()
    # A row with a NaN or +inf logit, or no finite one, is no distribution (NaN weights, an overflow). It is
    # flagged and sampled as if uniform, so the other rows of the batch go on; the engine fails its request.
    broken = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1)
    logits = logits.masked_fill(broken[:, None], 0.0)
    model_logprobs = torch.log_softmax(logits, dim=-1)
    logits = adjust_logits(logits, batch)  # what is chosen from; the reported logprobs stay the model's
    logits = mask_logits(logits, batch.allowed)  # structured output: only what the grammar allows
    tokens = logits.argmax(dim=-1)
    if batch.rows is not None:
        tokens = tokens.index_copy(0, batch.rows, _sample_rows(logits[batch.rows], batch))
    chosen = model_logprobs.gather(1, tokens[:, None])
    k = max(p.top_logprobs for p in batch.params)
    columns = [tokens[:, None].double(), chosen.double(), broken[:, None].double()]
    if k:
        top = torch.topk(model_logprobs, k, dim=-1)
        columns += [top.indices.double(), top.values.double()]
    # Token ids are exact in float64, so ids and log-probs travel in one tensor: one transfer, one sync.
    rows = torch.cat(columns, dim=1).tolist()
    top_lists = [list(zip(map(int, row[3:3 + p.top_logprobs]), row[3 + k:3 + k + p.top_logprobs]))
                 for row, p in zip(rows, batch.params)]
    return SampleOutput([int(row[0]) for row in rows], [row[1] for row in rows], top_lists,
                        [row[2] == 0.0 for row in rows])


def _sample_rows(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature, then top-k, then top-p (on the tempered distribution, as vLLM and HF do), then inverse
    transform sampling with the row's uniform draw."""
    values, order = (logits / batch.temperature).sort(dim=-1, descending=True)
    probs = torch.softmax(values, dim=-1)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    # A token survives top-p if the mass strictly before it is below top_p: the smallest set reaching
    # top_p is kept, and the most likely token always survives.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = (rank[None, :] < batch.top_k) & (mass_before < batch.top_p)
    cdf = (probs * keep).cumsum(dim=-1)
    # First rank whose cdf exceeds u * total: a token with zero mass (filtered out) can never be picked.
    pick = torch.searchsorted(cdf, (batch.uniform * cdf[:, -1])[:, None], right=True)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)  # rounding at the very top of the cdf
    return order.gather(1, pick)[:, 0]
