"""Speculative decoding: proposers of draft tokens, behind one small interface.

Each decode step a proposer guesses the next few tokens of a request; the target model then checks all of
them in one forward (serve/verify.py) and keeps the longest prefix it agrees with, plus one token of its own.
A step thus yields between 1 and k + 1 tokens for about the cost of one, when the guesses are cheap:

- `NgramProposer` (prompt lookup): the last n tokens of prompt + output already occurred earlier; propose
  what followed them there. Free to compute, and right surprisingly often on code, quotes, edits and any
  text that repeats its context. Its proposal is deterministic (a point mass).
- `DraftProposer`: a smaller model over the same vocabulary decodes k tokens ahead, with its own paged KV
  cache. For sampled requests it samples from its own distribution q (same temperature/top-k/top-p), which
  verification needs to keep the target's output distribution exact (serve/rejection.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from cybertron.errors import ConfigError, UserError
from cybertron.models.llama import Transformer
from cybertron.serve.cache import OutOfBlocks, PagedKVCache
from cybertron.serve.rejection import filtered_probs, sample_from
from cybertron.serve.sampling import SamplingParams

METHODS = ("ngram", "draft")


@dataclass
class SpeculativeConfig:
    """`Engine(..., speculative=SpeculativeConfig("ngram", k=4))`; method "draft" needs `draft` (a model over
    the target's vocabulary)."""

    method: str = "ngram"
    k: int = 4  # tokens proposed per step at most
    ngram_min: int = 1  # shortest suffix looked up (ngram)
    ngram_max: int = 3  # longest suffix looked up, tried first (ngram)
    draft: Transformer | None = None

    def validate(self, vocab_size: int | None = None) -> None:
        """ConfigError naming the first bad value; UserError if the draft's vocabulary is not the target's."""
        if self.method not in METHODS:
            raise ConfigError(f"speculative.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.k < 1:
            raise ConfigError(f"speculative.k must be >= 1, got {self.k}")
        if self.method == "ngram" and not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"speculative n-gram sizes need 1 <= ngram_min <= ngram_max, got "
                              f"{self.ngram_min} and {self.ngram_max}")
        if self.method == "draft":
            if self.draft is None:
                raise ConfigError("speculative.method 'draft' needs a draft model (--draft-model PATH)")
            if vocab_size is not None and self.draft.config.vocab_size != vocab_size:
                raise UserError(f"the draft model's vocabulary has {self.draft.config.vocab_size} tokens but the "
                                f"target's has {vocab_size}; a draft must share the target's tokenizer")


class Draftable(Protocol):
    """What a proposer reads of a request (the engine's requests have it)."""

    id: int
    params: SamplingParams
    generator: torch.Generator | None

    @property
    def tokens(self) -> list[int]: ...


@dataclass
class Proposal:
    tokens: list[int]  # d1..dk (may be empty: nothing to propose)
    # Draft distributions each d_i was drawn from, (k, vocab) on the device, and q_i(d_i) on the host;
    # None for a deterministic proposal (a point mass: q_i(d_i) = 1) and for greedy requests.
    probs: torch.Tensor | None = None
    q_at: list[float] | None = None


class Proposer(Protocol):
    def propose(self, requests: Sequence[Draftable], ks: Sequence[int]) -> list[Proposal]:
        """At most ks[i] tokens to follow requests[i].tokens, for each request."""
        ...

    def forget(self, live: set[int]) -> None:
        """Drop any state of requests whose id is not in `live` (finished, cancelled or preempted)."""
        ...


class NgramProposer:
    """Prompt lookup: match the last n tokens (n from ngram_max down to ngram_min) against earlier context.
    Each request's ids are kept encoded for the search and extended by its new tokens only."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._encoded: dict[int, bytearray] = {}

    def propose(self, requests: Sequence[Draftable], ks: Sequence[int]) -> list[Proposal]:
        proposals = []
        for r, k in zip(requests, ks):
            tokens = r.tokens
            data = self._encoded.setdefault(r.id, bytearray())
            data += array("i", tokens[len(data) // 4:]).tobytes()  # a request's tokens only ever grow
            proposals.append(Proposal(ngram_lookup(tokens, k, self.ngram_min, self.ngram_max, data)))
        return proposals

    def forget(self, live: set[int]) -> None:
        for seq_id in [s for s in self._encoded if s not in live]:
            del self._encoded[seq_id]


def ngram_lookup(tokens: Sequence[int], k: int, n_min: int, n_max: int,
                 data: bytes | bytearray | None = None) -> list[int]:
    """The k tokens that followed the most recent earlier occurrence of the longest matching suffix (n in
    [n_min, n_max]); [] if none occurs. A match close to the end has fewer than k tokens after it: the text
    is then taken to repeat with that period, so "a b a b" proposes "a b a b ..." rather than one token.

    The search runs in C: bytes.rfind over the ids as 4-byte integers (`data`, if the caller keeps them
    encoded), keeping matches on token boundaries. It scans the whole context of every request at every
    step, which a Python loop would make slow."""
    length = len(tokens)
    if data is None:
        data = array("i", tokens).tobytes()
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = bytes(data[(length - n) * 4:])
        end = (length - 1) * 4  # an earlier occurrence ends before the last token
        while (at := data.rfind(suffix, 0, end)) >= 0 and at % 4:
            end = at + len(suffix) - 1  # straddles two ids: look further back
        if at >= 0:
            follow = at // 4 + n  # index of the token after the match
            period = length - follow
            out: list[int] = []
            for i in range(k):
                out.append(tokens[follow + i] if i < period else out[i - period])
            return out
    return []


class DraftProposer:
    """A draft model decoding ahead with its own paged KV cache (same block size as the target's).

    Per request it remembers which tokens its cache holds: the context up to the last proposal, then the
    drafts it fed itself. At the next step the drafts the target accepted are still valid, so only the new
    tokens are fed again (a rejected draft's slot is simply overwritten, as positions define the slots)."""

    def __init__(self, model: Transformer, device: torch.device, block_size: int, num_blocks: int):
        self.model = model.to(device).eval()
        self.device = device
        cfg = model.config
        if cfg.is_mla:
            raise UserError("a draft model with latent attention (kv_lora_rank) is not supported yet; choose a "
                            "draft with standard attention")
        self.cache = PagedKVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_size, num_blocks, block_size,
                                  next(model.parameters()).dtype, device)
        self.cache.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]  # a windowed draft
        self.cache.attn_softcap = cfg.attn_softcap  # a soft-capped draft (Gemma 2)
        # id -> (tokens cached for sure, drafts written after them)
        self._written: dict[int, tuple[int, list[int]]] = {}

    def forget(self, live: set[int]) -> None:
        for seq_id in [s for s in self.cache.tables if s not in live]:
            self.cache.release(seq_id)
            self._written.pop(seq_id, None)

    def _cached(self, seq_id: int, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the cache holds the right k/v of (at most all but the last:
        the last one is fed to get the next token's logits)."""
        valid, drafts = self._written.get(seq_id, (0, []))
        for token in drafts:
            if valid < len(tokens) and tokens[valid] == token:
                valid += 1
            else:
                break
        return min(valid, len(tokens) - 1)

    def propose(self, requests: Sequence[Draftable], ks: Sequence[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in requests]
        rows: list[tuple[int, Draftable, int, int]] = []  # (index, request, k, cached)
        for i, (r, k) in enumerate(zip(requests, ks)):
            n = len(r.tokens)
            k = min(k, self.model.config.max_seq_len - n + 1)  # the draft's own context may be shorter
            if k < 1:
                continue
            try:
                self.cache.reserve(r.id, n + k - 1)  # feeds positions up to n + k - 2
            except OutOfBlocks:
                continue  # no room in the draft's pool: this request decodes without speculation
            rows.append((i, r, k, self._cached(r.id, r.tokens)))
        if not rows:
            return proposals
        drafted, q_rows = self._decode(rows)
        table = drafted.tolist()  # the one transfer of the whole proposal
        for (i, r, k, _), tokens, q in zip(rows, table, q_rows):
            tokens = [int(t) for t in tokens[:k]]
            self._written[r.id] = (len(r.tokens), tokens[:k - 1])
            if q:
                probs = torch.stack(q)
                q_at = probs.gather(1, torch.tensor(tokens, device=probs.device)[:, None])[:, 0].tolist()
                proposals[i] = Proposal(tokens, probs, q_at)
            else:
                proposals[i] = Proposal(tokens)
        return proposals

    def _decode(self, rows: list[tuple[int, Draftable, int, int]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """(rows, max k) drafted tokens on the device, and each sampled row's draft distributions. The first
        forward feeds every row's uncached tokens; each later one the previous draft of the rows still going.
        Nothing is read back on the host in between."""
        kmax = max(k for _, _, k, _ in rows)
        drafted = torch.zeros(len(rows), kmax, dtype=torch.int64, device=self.device)
        q_rows: list[list[torch.Tensor]] = [[] for _ in rows]
        fed = [len(r.tokens) - c for _, r, _, c in rows]
        width = max(fed)
        inputs = torch.tensor([r.tokens[c:] + [0] * (width - m) for (_, r, _, c), m in zip(rows, fed)])
        batch = self.cache.batch([r.id for _, r, _, _ in rows], [c for _, _, _, c in rows], fed)
        last = torch.tensor(fed).to(self.device, non_blocking=True) - 1
        logits = self.model(inputs.to(self.device, non_blocking=True), positions=batch.positions, cache=batch,
                            logits_at=last)
        active = list(range(len(rows)))
        for step in range(kmax):
            if step:
                active = [j for j in active if rows[j][2] > step]
                at = torch.tensor(active, device=self.device)
                batch = self.cache.batch([rows[j][1].id for j in active],
                                         [len(rows[j][1].tokens) + step - 1 for j in active], [1] * len(active))
                logits = self.model(drafted[at, step - 1][:, None], positions=batch.positions, cache=batch)[:, 0]
            tokens, probs = draw(logits.float(), [rows[j][1] for j in active], self.device)
            drafted[torch.tensor(active, device=self.device), step] = tokens
            for local, j in enumerate(active):
                if probs[local] is not None:
                    q_rows[j].append(probs[local])
        return drafted, q_rows


def draw(logits: torch.Tensor, requests: Sequence[Draftable],
         device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One token per row: the argmax for greedy requests, else a draw from the request's filtered
    distribution with its own generator. Returns the tokens (on the device) and each sampled row's
    distribution (None for greedy rows)."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
    out: list[torch.Tensor | None] = [None] * len(requests)
    if sampled:
        probs = filtered_probs(logits[torch.tensor(sampled, device=device)], [requests[i].params for i in sampled])
        uniform = torch.cat([torch.rand(1, generator=requests[i].generator) for i in sampled]).to(device)
        tokens = tokens.index_copy(0, torch.tensor(sampled, device=device), sample_from(probs, uniform))
        for local, i in enumerate(sampled):
            out[i] = probs[local]
    return tokens, out


def build_proposer(config: SpeculativeConfig, device: torch.device, block_size: int,
                   num_blocks: int) -> Proposer:
    if config.method == "ngram":
        return NgramProposer(config.ngram_min, config.ngram_max)
    assert config.draft is not None
    return DraftProposer(config.draft, device, block_size, num_blocks)
