"""Prefix-aware (aligned) batching with a batch-level scheduler over a host KV pool.

Requests whose KV lengths are close decode together, so no long-KV member stalls a step.
A batch stays aligned as it decodes (every member grows by one token per step).

Where a request is (`Request.status` in brackets):
    waiting    arrived; no host pool room reserved yet                  [WAITING]
    pool       admitted; in the KV-length index; KV (if any) is in the host pool [WAITING]
    candidate  picked for the next batch; its KV is being copied in    [WAITING]
    running    a member of the device's running batch                  [RUNNING]

Each step:
1. Admit waiting requests while the host pool can reserve their prompt (admission control:
   when it cannot, they wait, in arrival order; nothing is dropped).
2. Batch level. When the running batch is empty, thin (fewer than `min_batch` members) or
   must yield to a starving request, pick the next batch from the pool (densest KV-length
   window; around the oldest starving request if there is one) into the candidate buffer
   and start copying its KV in. The switch happens at the next step whose schedule finds
   those copies done, so they overlap the current batch's compute. On the switch, running
   members inside the new batch's window stay; the rest are swapped out, writing back only
   the KV blocks the host lacks.
3. Refill free slots of the running batch from the pool: starving requests first (whatever
   their length), then the requests nearest the batch's lengths within its window
   (`max_spread`, or `slack_tokens`); a batch below `min_batch` takes the nearest of any.
4. Give each member its decode token or the next chunk of its prefill under the token budget.

Starvation bound: a pooled request that has waited `max_queue_delay_s` joins the running
batch at the next free slot; when there is none, the running batch yields once it has run
`min_batch_steps` steps. Under a backlog that every request shares (a burst), starving
requests of the same age are taken nearest-length first, so alignment survives the bound.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from alignedserve.scheduling.aligned_config import AlignedConfig, AlignedStats
from alignedserve.scheduling.block_manager import KVBlockManager, blocks_for
from alignedserve.scheduling.interface import (
    ScheduledChunk,
    SchedulerOutput,
    SchedulerStats,
    TokenBudget,
)
from alignedserve.scheduling.length_index import InMemoryLengthIndex, KVLengthIndex
from alignedserve.scheduling.request import FinishReason, Request, RequestStatus
from alignedserve.scheduling.swap import HostAllocator, KVSwapper
from alignedserve.scheduling.window_search import aligned, densest_window, nearest_fill


class AlignedScheduler:
    """The aligned policy for one device. Same contract as FCFSScheduler, plus KV transfers."""

    def __init__(self, device: KVBlockManager, host: HostAllocator,
                 cfg: AlignedConfig | None = None, index: KVLengthIndex | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg or AlignedConfig()
        self.swap = KVSwapper(device, host)
        self.device = device
        self.index = index if index is not None else InMemoryLengthIndex()
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.pooled: dict[str, Request] = {}
        self.candidate: list[Request] = []
        self.running: list[Request] = []
        self.staged: dict[str, Request] = {}  # candidate-requests buffer (still pooled)
        self.requests: dict[str, Request] = {}
        self.counters = AlignedStats()
        self._batch_steps = 0  # steps the running batch has run since it was formed
        self._bmax = max(1, int(self.cfg.batch_kv_fraction * device.num_blocks))
        self._host_reserve = int(self.cfg.host_watermark * host.num_blocks)

    # -- the Scheduler protocol ---------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        bs = self.device.block_size
        cap = min(self.device.num_blocks, self.swap.host.num_blocks) * bs
        if req.num_prompt_tokens + 1 > cap:
            raise ValueError(f"prompt of {req.num_prompt_tokens} tokens cannot fit the KV pools "
                             f"({cap} tokens)")
        req.max_model_len = min(req.max_model_len, cap)  # alone, a request always fits
        req.queued_since = req.arrival_time
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        host = self.swap.host
        return SchedulerStats(
            running=len(self.running), waiting=len(self.waiting), pooled=len(self.pooled),
            device_usage=self.device.usage, host_blocks_used=host.num_blocks - host.num_free,
            batch_kv_lengths=tuple(r.num_tokens for r in self.running),
            counters={**vars(self.counters), **vars(self.swap.stats)})

    def transfers_done(self, seq: int) -> None:
        self.swap.transfers_done(seq)

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        self._admit()
        switched = self._advance_batch(now)
        self._refill(now)
        self._stage_refills()
        chunks, preempted = self._build_chunks(now)
        fence = max((c.request.kv_ready_seq for c in chunks), default=0)
        return SchedulerOutput(tuple(chunks), tuple(preempted), switched, self.swap.drain(),
                               fence if fence > self.swap.done_seq else 0)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        finished: list[Request] = []
        for c in out.chunks:
            req = c.request
            if req.status is not RequestStatus.RUNNING:
                continue  # finished early (abort, stop string) while the step ran
            req.num_computed_tokens = c.end
            if c.samples:
                reason = req.append_token(sampled[req.request_id])
                if reason is not None:
                    self._finish(req, reason)
                    finished.append(req)
        if out.chunks:
            self._batch_steps += 1
        return finished

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self._finish(req, reason)
        return req

    # -- admission ----------------------------------------------------------------------------

    def _admit(self) -> None:
        bs = self.device.block_size
        while self.waiting:
            req = self.waiting[0]
            need = blocks_for(req.num_tokens, bs) - len(req.host_block_ids)
            if self.swap.host_blocks_free() - need < self._host_reserve and self.pooled:
                return  # the pool is full: wait (an empty pool always admits one)
            if not self.swap.reserve_host(req, req.num_tokens):
                return
            self.waiting.popleft()
            self._to_pool(req)

    def _to_pool(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.pooled[req.request_id] = req
        self.index.put(req.request_id, req.num_tokens)

    def _take(self, req: Request) -> None:
        del self.pooled[req.request_id]
        self.index.remove(req.request_id)

    # -- batch level --------------------------------------------------------------------------

    def _starving(self, now: float, anchor: int | None = None) -> list[Request]:
        """Pooled requests past the bound. Most overdue first, counted in whole multiples of
        the bound so that a burst's requests tie; ties go nearest `anchor` (a KV length),
        or shortest first without one."""
        limit = self.cfg.max_queue_delay_s
        late = [r for r in self.pooled.values() if now - _queued_since(r) >= limit]

        def key(r: Request) -> tuple[int, int]:
            overdue = int((now - _queued_since(r)) // limit)
            return (-overdue, abs(r.num_tokens - anchor) if anchor is not None else r.num_tokens)

        return sorted(late, key=key)

    def _advance_batch(self, now: float) -> bool:
        if not self.candidate and self.pooled and self._wants_new_batch(now):
            n = len(self.running)
            full = n >= self.cfg.max_batch  # only asked when someone starves
            # Members inside the new batch's window stay on with it, so leave them room.
            picked = self._pick_batch(now, self.cfg.max_batch if full else self.cfg.max_batch - n)
            if not n or full or len(picked) > n:
                self.candidate = self._stage(picked)
        if not self.candidate:
            return False
        ready = all(r.kv_ready_seq <= self.swap.done_seq for r in self.candidate)
        if self.running and not ready:
            return False
        self._switch(now)
        return True

    def _wants_new_batch(self, now: float) -> bool:
        if len(self.running) < self.cfg.min_batch:
            return True  # drained below Kmin: a denser batch may be waiting in the pool
        full = len(self.running) >= self.cfg.max_batch
        return (full and self._batch_steps >= self.cfg.min_batch_steps
                and bool(self._starving(now)))

    def _pick_batch(self, now: float, cap: int) -> list[Request]:
        """The next batch from the pool (nothing moves yet)."""
        items = self.index.sorted_items()
        lengths = [n for n, _ in items]
        reqs = [self.pooled[rid] for _, rid in items]
        costs = [self._cost(r) for r in reqs]
        starving = self._starving(now)
        if starving:
            return self._around_starving(reqs, lengths, costs, starving)
        w = densest_window(lengths, costs, min_batch=self.cfg.min_batch,
                           max_batch=cap, max_spread=self.cfg.max_spread,
                           budget=self._bmax, slack_tokens=self.cfg.slack_tokens)
        return reqs[w.lo:w.hi] if w is not None else [min(reqs, key=self._age_key)]

    def _stage(self, picked: list[Request]) -> list[Request]:
        """Move `picked` into the candidate buffer and start copying their KV in."""
        self.counters.batches += 1
        batch = []
        for r in picked:
            self._take(r)
            if self.swap.swap_in(r):
                batch.append(r)
            else:
                self._to_pool(r)  # the device is full: it waits for a later batch
        return batch

    def _around_starving(self, reqs: list[Request], lengths: list[int], costs: list[int],
                         starving: list[Request]) -> list[Request]:
        """The oldest starving request, other starving ones nearest its length, then the rest
        of the pool nearest its length, within max_batch and Bmax (the anchor always)."""
        anchor = starving[0]
        late = {r.request_id for r in starving}
        first = [i for i, r in enumerate(reqs) if r.request_id in late]
        rest = [i for i, r in enumerate(reqs) if r.request_id not in late]
        picked, budget, slots = [], self._bmax, self.cfg.max_batch
        for group in (first, rest):
            sub = nearest_fill([lengths[i] for i in group], [costs[i] for i in group],
                               anchor.num_tokens, slots, budget)
            picked += [group[j] for j in sub]
            budget -= sum(costs[group[j]] for j in sub)
            slots -= len(sub)
        chosen = [reqs[i] for i in picked]
        if anchor not in chosen:
            chosen = [anchor]
        self.counters.starved += sum(r.request_id in late for r in chosen)
        return chosen

    def _switch(self, now: float) -> None:
        new = self.candidate
        lo, hi = min(r.num_tokens for r in new), max(r.num_tokens for r in new)
        room = self.cfg.max_batch - len(new)
        keep = []
        for r in list(self.running):  # members inside the new window stay; the rest swap out
            if room > 0 and self._fits(min(lo, r.num_tokens), max(hi, r.num_tokens)):
                keep.append(r)
                room -= 1
            else:
                self._swap_out(r, now)
        for r in new:
            r.status = RequestStatus.RUNNING
        self.running, self.candidate = keep + new, []
        self._batch_steps = 0
        self.counters.switches += 1

    def _refill(self, now: float) -> None:
        """Fill free slots: starving requests first, then the nearest lengths inside the
        batch's window; a batch below min_batch takes the nearest whatever their length."""
        free = self.cfg.max_batch - len(self.running)
        if free <= 0 or not self.pooled or not self.running:
            return
        lens = sorted(r.num_tokens for r in self.running)
        starving = self._starving(now, anchor=lens[len(lens) // 2])[:free]
        late = {r.request_id for r in starving}
        thin = len(lens) < self.cfg.min_batch
        inside = [r for r in self.pooled.values() if r.request_id not in late and (
            thin or self._fits(min(lens[0], r.num_tokens), max(lens[-1], r.num_tokens)))]
        budget = self._bmax - sum(self._cost(r) for r in self.running)
        near = nearest_fill([r.num_tokens for r in inside], [self._cost(r) for r in inside],
                            lens[len(lens) // 2], free - len(starving), max(0, budget))
        self.counters.starved += len(starving)
        for r in [*starving, *(inside[i] for i in near)]:
            self._take(r)
            if not self.swap.swap_in(r):
                self._to_pool(r)
                return
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            self.counters.refills += 1
            self.counters.refill_hits += self.staged.pop(r.request_id, None) is not None

    def _stage_refills(self) -> None:
        """Candidate-requests buffer: start copying in the KV of the pooled requests nearest
        the running batch's lengths, so that a freed slot is refilled without waiting on a
        copy. Staged requests stay in the pool (any batch may still take them); one that
        falls out of the window gives its device blocks back."""
        self.staged = {k: r for k, r in self.staged.items() if k in self.pooled}
        if not self.running or self.cfg.refill_buffer == 0:
            self._unstage(list(self.staged))
            return
        lens = sorted(r.num_tokens for r in self.running)
        fits = [r for r in self.pooled.values()
                if self._fits(min(lens[0], r.num_tokens), max(lens[-1], r.num_tokens))]
        self._unstage([k for k in self.staged if self.staged[k] not in fits])
        mid = lens[len(lens) // 2]
        todo = sorted((r for r in fits if r.num_computed_tokens and not r.block_ids),
                      key=lambda r: abs(r.num_tokens - mid))
        headroom = len(self.running)  # one new block per member per step, at most
        for r in todo[: self.cfg.refill_buffer - len(self.staged)]:
            if self.device.num_free_blocks - self._cost(r) < headroom or not self.swap.swap_in(r):
                return
            self.staged[r.request_id] = r

    def _unstage(self, ids: list[str]) -> None:
        for k in ids:
            self.swap.drop_device(self.staged.pop(k))

    # -- one step -----------------------------------------------------------------------------

    def _build_chunks(self, now: float) -> tuple[list[ScheduledChunk], list[str]]:
        budget = TokenBudget(self.cfg.max_num_batched_tokens)
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        # Decodes first, prefills last: prefills then never starve decodes of budget, and
        # preemption (from the end) hits the least-invested members.
        self.running.sort(key=lambda r: r.num_uncomputed_tokens > 1)
        i = 0
        while i < len(self.running):
            req = self.running[i]
            n = budget.take(req.num_uncomputed_tokens)
            if n == 0:
                i += 1
                continue  # no budget left for this prefill; it stays and waits a step
            while not self.device.try_grow(req, n):
                if self.staged:  # prefetched refills yield their blocks before members do
                    self._unstage(list(self.staged))
                    continue
                victim = self.running.pop()
                if not self._swap_out(victim, now):
                    preempted.append(victim.request_id)
                self.counters.preemptions += 1
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                budget.give_back(n)
                continue
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            i += 1
        chunks.sort(key=lambda c: not c.is_decode)
        return chunks, preempted

    def _swap_out(self, req: Request, now: float) -> bool:
        """Send a member back to the pool. False when its KV was dropped (recompute)."""
        if req in self.running:
            self.running.remove(req)
        kept = self.swap.swap_out(req)
        if not kept:
            self.swap.drop_device(req)
            req.num_computed_tokens = req.num_host_tokens = 0
            req.num_preemptions += 1
            self.counters.recomputes += 1
        req.queued_since = now
        self._to_pool(req)
        return kept

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.request_id in self.pooled:
            self._take(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.candidate:
            self.candidate.remove(req)
        elif req in self.running:
            self.running.remove(req)
        self.swap.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]

    def _fits(self, shortest: int, longest: int) -> bool:
        return aligned(shortest, longest, self.cfg.max_spread, self.cfg.slack_tokens)

    def _cost(self, req: Request) -> int:
        """Device blocks the request needs now plus its lookahead growth."""
        grow = min(self.cfg.lookahead_tokens, req.params.max_tokens - req.num_output_tokens)
        return blocks_for(req.num_tokens + max(0, grow), self.device.block_size)

    @staticmethod
    def _age_key(req: Request) -> tuple[float, int]:
        return (req.queued_since or 0.0, req.num_tokens)


def _queued_since(req: Request) -> float:
    """When a pooled request began waiting (set whenever it enters the pool)."""
    if req.queued_since is None:
        raise RuntimeError(f"{req.request_id} is pooled without a queued_since time")
    return req.queued_since
