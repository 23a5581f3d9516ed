"""One engine on several ranks that hold shards of one model (tensor parallelism): rank 0 leads, the others mirror.

Every rank runs an identical Engine on its shard. Only the leader (rank 0) takes requests; before each of its
steps it broadcasts what changed since the last one (requests added, with their prompt ids and sampling
parameters, and requests cancelled, in the order they happened), and every follower applies the same calls
to its engine and steps too. Scheduling therefore makes the same decisions on every rank, so each rank's
forward joins the same collectives, and after the row-parallel all-reduces every rank holds the same logits
and samples the same tokens from the same seeds. Each message also carries a checksum of the leader's last
step outputs: a follower that sampled anything else stops with an error instead of serving garbage.

The channel is a process group of its own with no practical timeout: a follower waits there while the
server is idle, for as long as that lasts (a dead leader closes the connection, which fails at once).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from secrets import randbits

import torch.distributed as dist

from cybertron.serve.engine import Engine, RequestOutput
from cybertron.serve.sampling import SamplingParams

IDLE_CHANNEL_TIMEOUT = timedelta(days=365)  # the server may sit idle for any time between two steps
LEADER = 0
FAILED_STEP = -1  # the checksum of a step that raised


@dataclass
class StepMessage:
    """What the leader sends before a step: the engine calls made since the last one, in order, as
    ("add", prompt_ids, params, options, request_id), ("cancel", request_id) or ("reset_prefix_cache",);
    then step, or stop for good."""

    calls: list[tuple] = field(default_factory=list)
    last_checksum: int = 0  # of the leader's previous step's outputs
    stop: bool = False


def outputs_checksum(outputs: Sequence[RequestOutput]) -> int:
    """A cheap fingerprint of what a step sampled (ids, tokens, whether each request finished)."""
    return zlib.crc32(repr([(o.request_id, o.token_ids, o.finished) for o in outputs]).encode())


def command_channel(timeout: timedelta = IDLE_CHANNEL_TIMEOUT) -> dist.ProcessGroup:
    """A gloo group over every rank for the leader's messages (objects travel through the CPU on NCCL runs
    too); every rank calls it once, at the same point."""
    return dist.new_group(backend="gloo", timeout=timeout)


class LeaderEngine(Engine):
    """An Engine on rank 0 whose add_request/cancel/step are replayed by the followers (`follow`); everything
    else, the server's AsyncEngine included, uses it as any Engine."""

    def __init__(self, *args, channel: dist.ProcessGroup, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel = channel
        self._calls: list[tuple] = []
        self._last_checksum = 0
        self._stopped = False

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None, **options) -> int:
        params = params or SamplingParams()
        if not params.greedy and params.seed is None:
            # Every rank must draw the same tokens, so an unseeded request gets its random seed here, once.
            params = dataclasses.replace(params, seed=randbits(63))
        request_id = super().add_request(prompt_ids, params, on_output, **options)
        self._calls.append(("add", list(prompt_ids), params, options, request_id))
        return request_id

    def cancel(self, request_id: int) -> bool:
        cancelled = super().cancel(request_id)
        if cancelled:
            self._calls.append(("cancel", request_id))
        return cancelled

    def reset_prefix_cache(self) -> None:
        super().reset_prefix_cache()
        self._calls.append(("reset_prefix_cache",))

    def step(self) -> list[RequestOutput]:
        self._send(StepMessage(self._calls, self._last_checksum))
        self._calls = []
        self._last_checksum = FAILED_STEP
        outputs = super().step()
        self._last_checksum = outputs_checksum(outputs)
        return outputs

    def stop_followers(self) -> None:
        """Tell the followers to return from `follow` (once; later calls do nothing)."""
        if not self._stopped:
            self._stopped = True
            self._send(StepMessage(self._calls, self._last_checksum, stop=True))

    def _send(self, message: StepMessage) -> None:
        dist.broadcast_object_list([message], src=LEADER, group=self.channel)


class RanksDiverged(RuntimeError):
    """A follower sampled something else than the leader: its shard's results can no longer be trusted."""


def follow(engine: Engine, channel: dist.ProcessGroup) -> int:
    """On a rank other than 0: apply the leader's calls and step until it says stop; returns the number of
    steps taken. Stopping is the leader's decision, so SIGINT/SIGTERM (a Ctrl-C reaches every rank of a
    terminal's process group) are ignored here: the leader shuts down and tells this rank."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    steps, checksum = 0, 0
    while True:
        box: list[StepMessage | None] = [None]
        dist.broadcast_object_list(box, src=LEADER, group=channel)
        message = box[0]
        assert message is not None
        if message.last_checksum != checksum:
            raise RanksDiverged(f"step {steps}: this rank sampled other tokens than rank 0 (tensor-parallel "
                                "results differ between ranks)")
        for call in message.calls:
            if call[0] == "add":
                _, prompt, params, options, leader_id = call
                request_id = engine.add_request(prompt, params, **options)
                assert request_id == leader_id, f"request id {request_id} here is {leader_id} on rank 0"
            elif call[0] == "cancel":
                engine.cancel(call[1])
            else:
                engine.reset_prefix_cache()
        if message.stop:
            return steps
        steps += 1
        try:
            checksum = outputs_checksum(engine.step())
        except Exception as err:  # as the leader's AsyncEngine does: report it and go on; the leader cancels
            traceback.print_exception(err, file=sys.stderr)
            checksum = FAILED_STEP
