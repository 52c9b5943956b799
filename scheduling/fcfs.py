"""The FCFS baseline: vLLM-style continuous batching.

Each step: running requests first (decode, or the rest of a chunked prefill, at most
`long_prefill_token_threshold` tokens of it), then waiting requests in arrival order while
the token budget, `max_num_seqs` and free blocks allow.
When a running request cannot grow, the most recently admitted running request is
preempted by recompute: its blocks are freed and it re-enters the front of the queue.
No length awareness.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from alignedserve.scheduling.block_manager import KVBlockManager, blocks_for
from alignedserve.scheduling.interface import (
    ScheduledChunk,
    SchedulerOutput,
    SchedulerStats,
    TokenBudget,
    advance,
)
from alignedserve.scheduling.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 256  # requests in one step at most
    max_num_batched_tokens: int = 2048  # tokens (prefill + decode) in one step at most
    # A running request's prefill chunk is at most this many tokens per step (vLLM's knob of
    # the same name), so a long prompt leaves room in every step for the first chunks of
    # newer requests; None: a chunk may take the whole budget.
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError("long_prefill_token_threshold must be >= 1")


class FCFSScheduler:
    """Continuous batching with FCFS admission and recompute preemption."""

    def __init__(self, kv: KVBlockManager, limits: SchedulerLimits | None = None) -> None:
        self.kv = kv
        self.limits = limits or SchedulerLimits()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if blocks_for(req.num_prompt_tokens + 1, self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(
                f"prompt of {req.num_prompt_tokens} tokens cannot fit the KV cache "
                f"({self.kv.num_blocks} blocks of {self.kv.block_size})"
            )
        # A request alone must always fit, or it would preempt itself forever.
        req.max_model_len = min(req.max_model_len, self.kv.num_blocks * self.kv.block_size)
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def transfers_done(self, seq: int) -> None:
        """FCFS never moves KV to the host pool (it preempts by recompute)."""

    @property
    def host_blocks_used(self) -> int:
        return 0  # no host pool: preemption recomputes

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=len(self.running), waiting=len(self.waiting), pooled=0,
            device_usage=self.kv.usage, host_blocks_used=self.host_blocks_used,
            batch_kv_lengths=tuple(r.num_tokens for r in self.running),
            counters={"preemptions": self.num_preemptions})

    def schedule(self) -> SchedulerOutput:
        budget = TokenBudget(self.limits.max_num_batched_tokens)
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget.remaining > 0:
            req = self.running[i]
            n = budget.take(self._chunk(req))
            while not self.kv.try_grow(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                budget.give_back(n)
                break
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            i += 1
        if not preempted:
            self._admit(budget, chunks)
        chunks.sort(key=lambda c: not c.is_decode)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _chunk(self, req: Request) -> int:
        """Tokens a running request asks for this step: its rest, a long prefill capped."""
        cap = self.limits.long_prefill_token_threshold
        n = req.num_uncomputed_tokens
        return min(n, cap) if cap is not None else n

    def _admit(self, budget: TokenBudget, chunks: list[ScheduledChunk]) -> None:
        while self.waiting and len(self.running) < self.limits.max_num_seqs:
            if budget.remaining <= 0:
                return
            req = self.waiting[0]
            n = budget.take(req.num_uncomputed_tokens)
            if not self.kv.try_grow(req, n, admit=True):
                budget.give_back(n)
                return
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))

    def _preempt(self, req: Request) -> None:
        self.kv.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        finished: list[Request] = []
        for req, reason in advance(out.chunks, sampled):
            self._finish(req, reason)
            finished.append(req)
        return finished

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return None
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._finish(req, reason)  # drops it from running
        return req

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
        self.kv.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
