"""The contract between a batch policy and whatever executes its batches.

An executor (the in-process engine, a compute replica, the simulator) loops:
    out = scheduler.schedule()
    sampled = run(out)                   # one token per request that reached its end
    finished = scheduler.update(out, sampled)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from alignedserve.scheduling.request import FinishReason, Request, RequestStatus


class ScheduledChunk(NamedTuple):
    """One request's share of a step. (A NamedTuple: immutable, and built for every member
    of every step, at half a frozen dataclass's cost.)"""

    request: Request  # in-process handle; the executor reads token_ids and block_ids
    start: int  # first position computed this step (= num_computed_tokens when scheduled)
    num_new_tokens: int  # positions [start, start + num_new_tokens) are computed

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last token, so a token is sampled."""
        return self.end == self.request.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.start > 0


@dataclass(frozen=True)
class KVTransfer:
    """Copy whole KV blocks between the device pool and the host pool.

    Transfers run in the background, strictly in `seq` order (one FIFO), so a swap-in of a
    request always reads what an earlier swap-out of it wrote.
    """

    seq: int  # issue order, from 1; the executor reports progress as "all <= seq done"
    request_id: str
    kind: Literal["swap_in", "swap_out"]  # swap_in: host -> device; swap_out: device -> host
    host_blocks: tuple[int, ...]  # host pool block ids
    device_blocks: tuple[int, ...]  # device pool block ids, pairwise with host_blocks


@dataclass(frozen=True)
class SchedulerOutput:
    """What to run in one step. Decode chunks come first, then prefill chunks."""

    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...] = ()  # request ids whose KV was dropped this step
    batch_switch: bool = False  # set by batch-level policies when the running batch changed
    transfers: tuple[KVTransfer, ...] = ()  # start these now, in order, in the background
    fence: int = 0  # transfers with seq <= fence must be done before this step computes

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


def advance(chunks: tuple[ScheduledChunk, ...], sampled: dict[str, int]
            ) -> Iterator[tuple[Request, FinishReason]]:
    """A step ran `chunks`: advance each running request's computed count and append the
    token it sampled; yield the requests that end now, with why, one at a time (each
    policy removes one before the next chunk is read). Requests no longer running (aborted
    or stopped while the step ran) are skipped. Runs once per chunk of every step, so the
    chunk's properties are inlined."""
    running = RequestStatus.RUNNING
    for c in chunks:
        req = c.request
        if req.status is not running:
            continue
        end = c.start + c.num_new_tokens
        req.num_computed_tokens = end
        if end == len(req.token_ids):  # c.samples
            reason = req.append_token(sampled[req.request_id])
            if reason is not None:
                yield req, reason


@dataclass(frozen=True)
class SchedulerStats:
    """A policy's state and counters, as executors, metrics and the simulator read them."""

    running: int  # requests in the running batch
    waiting: int  # not yet admitted (fcfs: also preempted ones waiting to be recomputed)
    pooled: int  # aligned: admitted, KV in the host pool, waiting for a batch (fcfs: 0)
    device_usage: float  # fraction of the device KV pool in use, 0..1
    host_blocks_used: int  # aligned: host KV pool blocks held (fcfs: 0)
    batch_kv_lengths: tuple[int, ...]  # KV length (tokens) of each running request
    counters: dict[str, int]  # cumulative policy counters: "preemptions", and for aligned
    #                           every AlignedStats and SwapStats field ("switches", ...)


class TokenBudget:
    """Per-step token budget. `take(want)` grants between 0 and `want` tokens."""

    def __init__(self, limit: int) -> None:
        self.remaining = limit

    def take(self, want: int) -> int:
        granted = min(want, self.remaining)
        self.remaining -= granted
        return granted

    def give_back(self, n: int) -> None:
        self.remaining += n


class Scheduler(Protocol):
    """A batch policy. Invariants: a request is in exactly one of waiting, running or
    finished; a finished or aborted request holds no KV blocks."""

    def add_request(self, req: Request) -> None: ...

    def schedule(self) -> SchedulerOutput: ...

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens; return requests that finished."""
        ...

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request early (abort, stop string); frees its blocks."""
        ...

    def has_unfinished(self) -> bool: ...

    def transfers_done(self, seq: int) -> None:
        """The executor finished every KVTransfer with seq <= `seq`."""
        ...

    def stats(self) -> SchedulerStats:
        """A snapshot; cheap enough to call once per step."""
        ...

    @property
    def host_blocks_used(self) -> int:
        """Host KV pool blocks held (a policy without a host pool: 0)."""
        ...
