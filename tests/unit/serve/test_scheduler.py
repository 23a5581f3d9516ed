"""The scheduler without a model: a fake run marks what each step scheduled as computed (and samples a
token where a row reaches the end of its tokens), exactly the bookkeeping the engine does."""

from dataclasses import dataclass, field

import pytest

from cybertron.serve.block_manager import BlockManager
from cybertron.serve.cache import PagedKVCache
from cybertron.serve.scheduler import Scheduler

BS = 4


@dataclass(eq=False)
class Seq:
    id: int
    prompt: list[int]
    max_tokens: int = 3
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    adapter: str | None = None

    @property
    def tokens(self):
        return self.prompt + self.output

    @property
    def prefix_key(self):
        return self.adapter


def _scheduler(num_blocks=64, max_batch_size=8, budget=64, chunked=True, prefix_caching=True):
    cache = PagedKVCache(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=num_blocks, block_size=BS)
    return Scheduler(BlockManager(cache, prefix_caching), max_batch_size, budget, chunked)


def _run(scheduler, step):
    """What the engine does after the model call: computed counts, commits, sampled tokens, finishes."""
    rows = [(seq, 1, True) for seq in step.decode] + [(c.seq, c.length, c.completes) for c in step.prefill]
    for seq, n, samples in rows:
        seq.num_computed += n
        if samples:
            scheduler.blocks.commit(seq.id, seq.tokens, seq.num_computed)
            seq.output.append(1000 + len(seq.output))
            if len(seq.output) == seq.max_tokens:
                scheduler.finish(seq)


def _drain(scheduler, limit=500):
    steps = []
    while scheduler.has_unfinished():
        step = scheduler.schedule()
        _run(scheduler, step)
        steps.append(step)
        assert len(steps) < limit
    return steps


def _prompt(n, seed=0):
    return [(seed * 7919 + i * 31) % 251 for i in range(n)]


def test_admission_is_first_come_first_served_within_the_batch_slots():
    scheduler = _scheduler(max_batch_size=2)
    seqs = [Seq(i, _prompt(5, seed=i)) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    assert [c.seq for c in step.prefill] == seqs[:2] and list(scheduler.waiting) == seqs[2:]
    _drain(scheduler)
    assert all(len(s.output) == 3 for s in seqs)
    assert scheduler.blocks.num_free == scheduler.blocks.num_total


@pytest.mark.parametrize("chunked", [True, False])
def test_every_step_stays_within_the_token_budget(chunked):
    scheduler = _scheduler(max_batch_size=6, budget=24, chunked=chunked)
    lengths = [3, 40, 7, 11, 2, 23, 9, 5]
    for i, n in enumerate(lengths):
        scheduler.add(Seq(i, _prompt(n, seed=i), max_tokens=4))
    for step in _drain(scheduler):
        # Unchunked, one prompt larger than the budget runs alone; chunked, nothing ever exceeds it.
        assert step.num_tokens <= 24 or (not chunked and len(step.prefill) == 1)
    assert scheduler.blocks.num_free == scheduler.blocks.num_total


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding():
    scheduler = _scheduler(budget=16)
    streams = [Seq(i, _prompt(3, seed=i), max_tokens=30) for i in range(2)]
    for seq in streams:
        scheduler.add(seq)
    _run(scheduler, scheduler.schedule())  # both prefilled
    long = Seq(9, _prompt(50, seed=9), max_tokens=2)
    scheduler.add(long)
    chunks = []
    while not long.output:
        step = scheduler.schedule()
        assert step.decode == streams  # every step, both streams decode
        chunks += [(c.start, c.length) for c in step.prefill]
        _run(scheduler, step)
    # 14 tokens a step (16 minus the two decode rows), each chunk starting where the last one ended.
    assert chunks == [(0, 14), (14, 14), (28, 14), (42, 8)]


def test_unchunked_a_long_prompt_is_prefilled_whole_in_one_step():
    scheduler = _scheduler(budget=16, chunked=False)
    scheduler.add(Seq(0, _prompt(50)))
    step = scheduler.schedule()
    assert [(c.start, c.length, c.completes) for c in step.prefill] == [(0, 50, True)]


def test_preemption_takes_the_newest_sequence_first_and_it_resumes_from_its_cached_blocks():
    scheduler = _scheduler(num_blocks=7, max_batch_size=3)
    seqs = [Seq(i, _prompt(6, seed=i), max_tokens=8) for i in range(3)]  # 2 blocks each now, 4 at the end
    for seq in seqs:
        scheduler.add(seq)
    steps = _drain(scheduler)
    preempted = [s for step in steps for s in step.preempted]
    assert preempted and preempted[0] is seqs[2]
    first = next(i for i, step in enumerate(steps) if step.preempted)
    assert seqs[0] not in steps[first].preempted
    # Re-admitted with prompt + output as its tokens, it finds its own full blocks still cached.
    assert sum(step.hit_tokens for step in steps) > 0
    assert all(len(s.output) == 8 for s in seqs)
    assert scheduler.blocks.num_free == scheduler.blocks.num_total


def test_a_prefix_hit_reduces_the_tokens_scheduled():
    scheduler = _scheduler()
    prompt = _prompt(19)
    scheduler.add(Seq(0, prompt))
    _run(scheduler, scheduler.schedule())
    scheduler.add(Seq(1, prompt + [7, 8]))  # shares the first four blocks
    step = scheduler.schedule()
    (chunk,) = step.prefill
    assert (chunk.start, chunk.length, step.hit_tokens) == (16, 5, 16)


def test_identical_prompts_admitted_together_are_prefilled_once():
    scheduler = _scheduler()
    prompt = _prompt(18)
    group = [Seq(i, prompt) for i in range(4)]
    other = Seq(9, _prompt(6, seed=5))
    for seq in [*group, other]:
        scheduler.add(seq)
    first = scheduler.schedule()
    # The others wait for the copy being prefilled; an unrelated prompt behind them goes ahead.
    assert [c.seq for c in first.prefill] == [group[0], other]
    assert list(scheduler.waiting) == group[1:]
    _run(scheduler, first)
    second = scheduler.schedule()
    assert [(c.seq, c.start, c.length) for c in second.prefill] == [(s, 16, 2) for s in group[1:]]
    assert second.hit_tokens == 3 * 16


def test_without_prefix_caching_identical_prompts_are_each_prefilled():
    scheduler = _scheduler(prefix_caching=False)
    for i in range(3):
        scheduler.add(Seq(i, _prompt(18)))
    step = scheduler.schedule()
    assert [c.length for c in step.prefill] == [18, 18, 18] and step.hit_tokens == 0
