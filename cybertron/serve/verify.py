"""Speculative decoding in the engine: propose, verify in one target forward, append what is accepted.

For each decoding request with a proposal d1..dk, one forward of the target over [last token, d1..dk] at
positions n-1..n+k-1 (n: tokens so far) gives the target's logits after each prefix. Greedy requests keep
the longest prefix of drafts equal to the target's argmax, then the target's own argmax after it; sampled
requests apply the rejection rule of serve/rejection.py. Either way a step appends 1..k+1 tokens, each
exactly what (greedy) or distributed as (sampled) decoding without speculation would give. Log-probs are
the target's. A speculating sampled request draws different random numbers than without speculation, so a
seed gives the same text run after run (whatever else is in the batch, given room in the KV pool for the
drafts), but not the same text as with speculation off.

The engine calls `Speculator.decode` once per step with the requests about to decode. When some request
speculates, the others it can take (no proposal, no room, backing off) decode in the same forward as rows
without drafts; requests with unsupported parameters come back and decode normally.

A verification that keeps no draft costs more than a plain decode step (a (k+1)-token forward, the acceptance
arithmetic, the draft's own work), so a request whose drafts keep failing backs off: after each such step it
decodes plainly for 1, 2, 4 ... MAX_BACKOFF steps before it is tried again, and any accepted draft resets
that. Which steps speculate changes speed only: every step's output is exact either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from cybertron.serve.outputs import RequestOutput
from cybertron.serve.rejection import accepted_count, filtered_probs, residual, sample_from
from cybertron.serve.sampling import NON_FINITE_LOGITS, SamplingBatch, SamplingParams, sample
from cybertron.serve.speculative import Proposal, SpeculativeConfig, build_proposer

# The Engine (serve/engine.py) calls this module and is handed back in; importing it here would be a cycle.
Engine = Any

MAX_BACKOFF = 16  # plain decode steps at most between two tries of a request whose drafts keep failing


@dataclass
class SpeculativeStats:
    steps: int = 0  # verification forwards
    proposed: int = 0  # draft tokens checked by the target
    accepted: int = 0  # draft tokens the target kept
    emitted: int = 0  # tokens appended by speculative steps (accepted + the target's own)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def speculation_supported(params: SamplingParams) -> bool:
    """Whether a request may be speculated. logit_bias and penalties change the logits token by token (a
    penalty depends on the drafts before it), and top_logprobs would need every position's list: such
    requests decode normally, as do constrained ones (a grammar must check each draft before it is kept)."""
    return not (params.logit_bias or params.penalized or params.top_logprobs or params.grammar is not None)


@dataclass
class _Checked:
    """One request's verification, decided on the host."""

    request: Any
    proposal: Proposal
    accepted: int  # drafts kept
    final: int | None = None  # the target's own token after them (None: still to be sampled)
    final_logprob: float = 0.0
    broken: bool = False  # the logits the next token needs are not finite: the request fails


class Speculator:
    """The engine's speculative decoding: a proposer (speculative.py), verification, and its counters."""

    def __init__(self, config: SpeculativeConfig, engine: Engine):
        config.validate(engine.config.vocab_size)
        self.config = config
        self.proposer = build_proposer(config, engine.device, engine.cache.block_size,
                                       engine.cache.num_total_blocks)
        self.stats = SpeculativeStats()
        self._backoff: dict[int, int] = {}  # request id -> plain steps after its last failed verification
        self._skip: dict[int, int] = {}  # request id -> plain steps left before it is tried again

    def decode(self, engine: Engine, requests: list) -> tuple[list, list[tuple[Any, RequestOutput]]]:
        """Speculative steps for the requests it can take; returns (the others, the outputs produced)."""
        live = {r.id for r in engine.running}
        self.proposer.forget(live)
        for table in (self._backoff, self._skip):
            for seq_id in [s for s in table if s not in live]:
                del table[seq_id]
        chosen, ks, rest = [], [], []
        for r in requests:
            if self._skip.get(r.id, 0) > 0:
                self._skip[r.id] -= 1
                rest.append(r)
                continue
            k = self._budget(engine, r) if speculation_supported(r.params) else 0
            if k >= 1:
                chosen.append(r)
                ks.append(k)
            else:
                rest.append(r)
        speculated = []
        for r, proposal in zip(chosen, self.proposer.propose(chosen, ks) if chosen else []):
            proposal = _fit(engine, r, proposal)
            if proposal.tokens:
                speculated.append((r, proposal))
            else:
                rest.append(r)
        if speculated:
            # The others this step can take decode as rows without drafts of the same forward: one model call
            # instead of a verification plus a plain decode batch.
            speculated += [(r, Proposal([])) for r in rest if speculation_supported(r.params)]
            rest = [r for r in rest if not speculation_supported(r.params)]
        produced = []
        # Batches of similar lengths within the engine's attention-key budget, as plain decode rows are.
        for group in engine.runner.decode_groups([len(r.tokens) + len(p.tokens) for r, p in speculated]):
            produced += self._verify(engine, [speculated[i] for i in group])
        return rest, produced

    def _budget(self, engine: Engine, request: Any) -> int:
        """Drafts worth proposing: k + 1 new tokens must fit in max_tokens and in the context."""
        n = len(request.tokens)
        left = request.params.max_tokens - len(request.output)
        return min(self.config.k, left - 1, engine.config.max_seq_len - n - 1)

    def _verify(self, engine: Engine, group: list[tuple[Any, Proposal]]) -> list[tuple[Any, RequestOutput]]:
        requests = [r for r, _ in group]
        drafts = [p.tokens for _, p in group]
        num_new = [len(d) + 1 for d in drafts]
        width = max(num_new)
        inputs = torch.tensor([[r.tokens[-1], *d] + [0] * (width - len(d) - 1) for r, d in zip(requests, drafts)])
        inputs = inputs.to(engine.device, non_blocking=True)
        # Rows without drafts are plain decode rows: the engine's own sampler picks their token, drawing what
        # it would draw in a plain step, so what they sample never depends on the other requests.
        plain = [i for i, d in enumerate(drafts) if not d]
        plain_sampling = SamplingBatch.build([requests[i].params for i in plain],
                                             [requests[i].generator for i in plain], engine.device) if plain else None
        # The k/v of every draft is written at its position. Where a draft is rejected, the token that really
        # comes there is fed at the same position later and overwrites it before any query can see it (each
        # query sees keys up to its own position only), so rejected k/v need no clean-up. Nor can it reach the
        # prefix cache: only blocks below num_computed, which counts accepted tokens alone, are registered.
        batch = engine.cache.batch([r.id for r in requests], [len(r.tokens) - 1 for r in requests], num_new)
        logits = engine.model(inputs, positions=batch.positions, cache=batch).float()  # (B, W, vocab)
        drawn = sample(logits[plain, 0], plain_sampling) if plain else None
        broken = logits.isnan().any(-1) | logits.isposinf().any(-1) | logits.isneginf().all(-1)
        logits = logits.masked_fill(broken[..., None], 0.0)
        logprobs = torch.log_softmax(logits, dim=-1)  # the model's, as the sampler reports them
        best = logits.argmax(dim=-1)
        best_lp = logprobs.gather(-1, best[..., None])[..., 0]
        draft_lp = logprobs[:, :-1].gather(-1, inputs[:, 1:, None])[..., 0]  # log p(d_i) (pads: ignored)
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy and drafts[i]]
        p_at = torch.zeros_like(draft_lp)
        probs = None
        if sampled:
            rows = torch.tensor(sampled, device=engine.device)
            params = [requests[i].params for i in sampled for _ in range(width)]
            probs = filtered_probs(logits[rows].flatten(0, 1), params).view(len(sampled), width, -1)
            p_at = p_at.index_copy(0, rows, probs[:, :-1].gather(-1, inputs[rows, 1:, None])[..., 0])
        # One transfer of everything the host decides with.
        host = torch.cat([best.double(), best_lp.double(), broken.double(), draft_lp.double(), p_at.double()],
                         dim=1).tolist()
        checked = [self._check(r, p, row, width) for r, p, row in zip(requests, (p for _, p in group), host)]
        for slot, i in enumerate(plain):
            finite = drawn.finite[slot]
            checked[i] = _Checked(requests[i], group[i][1], 0, drawn.tokens[slot] if finite else None,
                                  drawn.logprobs[slot], broken=not finite)
        self._sample_finals(engine, checked, sampled, probs, logprobs)
        return [(c.request, self._append(engine, c, row, width)) for c, row in zip(checked, host)]

    def _check(self, request: Any, proposal: Proposal, row: list[float], width: int) -> _Checked:
        """How many drafts the target keeps, and (greedy) its own token after them."""
        k = len(proposal.tokens)
        best, broken, p_at = row[:width], row[2 * width:3 * width], row[4 * width - 1:5 * width - 2]
        usable = next((i for i in range(k + 1) if broken[i]), k + 1)  # rows before the first broken one
        if request.params.greedy:
            kept = 0
            while kept < min(k, usable) and proposal.tokens[kept] == int(best[kept]):
                kept += 1
        else:
            q_at = proposal.q_at or [1.0] * k
            kept = accepted_count([p_at[i] / q_at[i] for i in range(min(k, usable))], request.generator)
        if kept == usable:
            return _Checked(request, proposal, kept, broken=True)
        if request.params.greedy:
            return _Checked(request, proposal, kept, int(best[kept]), row[width + kept])
        return _Checked(request, proposal, kept)

    @staticmethod
    def _sample_finals(engine: Engine, checked: list[_Checked], sampled: Sequence[int], probs: torch.Tensor | None,
                       logprobs: torch.Tensor) -> None:
        """The target's own token of each sampled request: from the residual at its first rejected draft,
        or from p after the last draft when all were kept. All requests in one batch, one transfer."""
        todo = [(slot, i) for slot, i in enumerate(sampled) if checked[i].final is None and not checked[i].broken]
        if not todo:
            return
        dists = []
        for slot, i in todo:
            c = checked[i]
            p = probs[slot, c.accepted]
            if c.accepted < len(c.proposal.tokens):
                q = c.proposal.probs[c.accepted] if c.proposal.probs is not None else None
                p = residual(p, q, c.proposal.tokens[c.accepted])
            dists.append(p)
        uniform = torch.cat([torch.rand(1, generator=checked[i].request.generator) for _, i in todo])
        tokens = sample_from(torch.stack(dists), uniform.to(engine.device))
        at = torch.tensor([[i, checked[i].accepted] for _, i in todo], device=engine.device)
        lps = logprobs[at[:, 0], at[:, 1]].gather(1, tokens[:, None])[:, 0]
        for (_, i), token, lp in zip(todo, tokens.tolist(), lps.tolist()):
            checked[i].final, checked[i].final_logprob = int(token), lp

    def _append(self, engine: Engine, c: _Checked, row: list[float], width: int) -> RequestOutput:
        """Append the kept drafts and the target's token one by one, as decoding would (stop tokens and
        strings, max_tokens and the context end the request mid-way); one output for all of them."""
        tokens = c.proposal.tokens[:c.accepted]
        logprobs = row[3 * width:3 * width + c.accepted]
        if c.final is not None:
            tokens, logprobs = [*tokens, c.final], [*logprobs, c.final_logprob]
        drafted = bool(c.proposal.tokens)  # else a plain decode row riding along
        if drafted:
            self.stats.steps += 1
            self.stats.proposed += len(c.proposal.tokens)
            self.stats.accepted += c.accepted
            if c.accepted:
                self._backoff.pop(c.request.id, None)
            else:
                wait = min(2 * self._backoff.get(c.request.id, 0) or 1, MAX_BACKOFF)
                self._backoff[c.request.id] = self._skip[c.request.id] = wait
        outputs, request = [], c.request
        for token, logprob in zip(tokens, logprobs):
            # As after a plain decode step: the KV of the token before this one is in the cache now (its
            # row of the verification forward), so its full blocks may join the prefix cache.
            request.num_computed += 1
            engine.blocks.commit(request.id, request.tokens, request.num_computed, request.prefix_key)
            outputs.append(engine._append(request, token, logprob, []))
            self.stats.emitted += drafted
            if outputs[-1].finished:
                break
        else:
            if c.broken:
                outputs.append(engine._fail(request, NON_FINITE_LOGITS))
        return _merge(outputs)


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """One output of several appended tokens (the last one says whether and why the request finished)."""
    return replace(outputs[-1], token_ids=[t for o in outputs for t in o.token_ids],
                   logprobs=[lp for o in outputs for lp in o.logprobs], top_logprobs=[],
                   text="".join(o.text for o in outputs))


def _fit(engine: Engine, request: Any, proposal: Proposal) -> Proposal:
    """Reserve the target's blocks for the drafts; with too few free blocks, only as many drafts as fit in
    the blocks the request already has (speculation never preempts anyone)."""
    n, want = len(request.tokens), len(proposal.tokens)
    cache = engine.cache
    if want and cache.extra_blocks_needed(request.id, n + want) > cache.num_free_blocks:
        want = max(0, len(cache.tables[request.id]) * cache.block_size - n)
    if want < len(proposal.tokens):
        probs = proposal.probs[:want] if proposal.probs is not None else None
        q_at = proposal.q_at[:want] if proposal.q_at is not None else None
        proposal = Proposal(proposal.tokens[:want], probs, q_at)
    if want:
        cache.reserve(request.id, n + want)
    return proposal
