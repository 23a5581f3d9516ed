"""Which sequences run in the next step, and how many of their tokens: waiting and running queues, admission,
preemption and the per-step token budget. Pure Python over the block manager (no model, no tensors).

A step has a budget of `max_num_batched_tokens`, shared by decode rows (one token each) and prefill rows
(counted as rows x the longest chunk, since prefill rows are padded to one length). Running sequences decode
first, oldest first; if the pool has no room for a sequence's next token the newest running sequence is
preempted: it gives back its blocks and goes back to the head of the queue, to be recomputed later (its
computed full blocks stay cached, so that mostly hits the prefix cache). What is left of the budget goes to
prefill: first the running sequences still in the middle of their prompt, then waiting ones, first come first
served, while batch slots and blocks last.

With chunked prefill a prompt takes as many tokens as the budget leaves and continues in later steps, so a
long prompt never stalls the running streams for more than one budget's worth of work per step. Without it a
prompt is prefilled whole, and one larger than the budget is admitted alone.

A sequence whose next block is being computed right now by another one's prefill (GRPO sends the same prompt
group_size times) waits a step and then shares it instead of computing it again; the ones behind it may go
first meanwhile.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from cybertron.serve.block_manager import BlockManager


class Schedulable(Protocol):
    """What the scheduler reads and writes on a sequence."""

    id: int
    num_computed: int  # tokens whose KV is in the cache

    @property
    def tokens(self) -> list[int]: ...

    @property
    def prefix_key(self) -> object:
        """Part of the prefix-cache key: KV computed under another adapter (or LongRoPE's other factors)
        differs."""
        ...


@dataclass
class PrefillChunk:
    seq: Schedulable
    start: int  # tokens already cached (prefix hit or earlier chunks)
    length: int

    @property
    def completes(self) -> bool:
        """Reaches the end of the sequence's tokens: the step samples its next token."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass
class ScheduledStep:
    decode: list[Schedulable] = field(default_factory=list)  # one new token each
    prefill: list[PrefillChunk] = field(default_factory=list)
    preempted: list[Schedulable] = field(default_factory=list)
    hit_tokens: int = 0  # prompt tokens the admitted sequences found in the prefix cache

    @property
    def num_tokens(self) -> int:
        """The step's cost as the budget counts it."""
        width = max((c.length for c in self.prefill), default=0)
        return len(self.decode) + width * len(self.prefill)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_batched_tokens: int,
                 chunked_prefill: bool = True):
        if not 0 < max_batch_size < max_num_batched_tokens:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must exceed max_batch_size "
                             f"({max_batch_size}) > 0: a step of full decode rows must leave room to prefill")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []  # in admission order: the newest last

    def add(self, seq: Schedulable) -> None:
        seq.num_computed = 0
        self.waiting.append(seq)

    def finish(self, seq: Schedulable) -> None:
        """The sequence is done (finished, cancelled or failed): out of the queues, blocks returned."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.forget(seq.id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        step.decode = self._reserve_decode_slots(step.preempted)
        budget = self.max_num_batched_tokens - len(step.decode)
        for seq in self.running:
            remaining = len(seq.tokens) - seq.num_computed
            if remaining > 1 and not self._add_chunk(step.prefill, seq, seq.num_computed, budget):
                break
        self._admit(step, budget)
        return step

    def _reserve_decode_slots(self, preempted: list[Schedulable]) -> list[Schedulable]:
        """Room for each decoding sequence's next token, oldest first; the newest running ones are
        preempted when the pool is full."""
        ready: list[Schedulable] = []
        cache = self.blocks.cache
        for seq in list(self.running):
            if seq not in self.running or len(seq.tokens) - seq.num_computed != 1:
                continue  # preempted below to make room for an older one, or still prefilling
            need = len(seq.tokens)
            while cache.extra_blocks_needed(seq.id, need) > cache.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                cache.reserve(seq.id, need)
                ready.append(seq)
        return [seq for seq in ready if seq in self.running]

    def recompute(self, seq: Schedulable) -> None:
        """Drop a running sequence's KV (its cached prefix too: its key changed) and queue it first, to be
        prefilled again from its first token: LongRoPE's switch to the long factors (serve/engine.py)."""
        self.blocks.forget(seq.id)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Schedulable) -> None:
        self.blocks.release(seq.id)
        seq.num_computed = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        """Waiting sequences, first come first served, while batch slots, blocks and the budget last."""
        passed_over: list[Schedulable] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            tokens = seq.tokens
            hits = self.blocks.match(seq.id, tokens, seq.prefix_key)
            if self.blocks.waits_on_pending(seq.id, tokens, hits, seq.prefix_key):
                passed_over.append(self.waiting.popleft())
                continue
            if self.blocks.blocks_to_admit(hits, len(tokens)) > self.blocks.num_free:
                break
            start = len(hits) * self.blocks.block_size
            if not self._fits(step.prefill, len(tokens) - start, budget):
                break
            self.waiting.popleft()
            seq.num_computed = self.blocks.admit(seq.id, tokens, hits, seq.prefix_key)
            step.hit_tokens += seq.num_computed
            self.running.append(seq)
            self._add_chunk(step.prefill, seq, start, budget)
        self.waiting.extendleft(reversed(passed_over))

    def _chunk_length(self, chunks: list[PrefillChunk], remaining: int, budget: int) -> int:
        """How many of `remaining` prompt tokens one more prefill row may take; 0 if none fit."""
        rows, width = len(chunks) + 1, max((c.length for c in chunks), default=0)
        if not self.chunked_prefill:
            return remaining if not chunks or rows * max(width, remaining) <= budget else 0
        if rows * width > budget:
            return 0
        return max(0, min(remaining, budget // rows))

    def _fits(self, chunks: list[PrefillChunk], remaining: int, budget: int) -> bool:
        return self._chunk_length(chunks, remaining, budget) > 0

    def _add_chunk(self, chunks: list[PrefillChunk], seq: Schedulable, start: int, budget: int) -> bool:
        length = self._chunk_length(chunks, len(seq.tokens) - start, budget)
        if length:
            chunks.append(PrefillChunk(seq, start, length))
        return length > 0
