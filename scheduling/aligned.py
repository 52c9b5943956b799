"""Prefix-aware (aligned) batching over a host KV pool: policy v2.

Requests whose KV lengths are close decode together, so no long-KV member stalls a step.
A batch stays aligned as it decodes (every member grows by one token per step).

Where a request is (`Request.status` in brackets):
    waiting    arrived; no host pool room reserved yet                   [WAITING]
    pool       admitted; in the KV-length index; KV (if any) in the host pool [WAITING]
    staged     pooled, and its KV is already being copied to the device  [WAITING]
               (the candidate-requests buffer, at most Bmax of the device pool)
    running    a member of the device's running batch                    [RUNNING]

The running batch has a *band*: the densest aligned range of its members' KV lengths
(`max_spread`, or `slack_tokens`). Each step:
1. Admit waiting requests while the host pool can reserve their prompt (admission control:
   when it cannot, they wait in arrival order; nothing is dropped).
2. Fill. The running batch may fill the device pool, as fcfs does: free slots and blocks
   (kept back: the running batch's peak growth over the lookahead, `DeviceFit.room`) go to
   pooled requests in `aging_score` order, those inside the band first, oldest first. A
   request outside the band joins only once it has waited `max_wait_steps` per band of
   distance: the starvation bound, counted in engine steps so that the same workload
   batches alike on any machine (a swapped-out member keeps its age). Under `longest`,
   when the whole pool fits the room, nothing waits for its band. A batch below
   Kmin (`min_batch`, capped at what fits the device) is thin: its band moves to the pool's
   densest group (among the most overdue requests, if any are overdue). The members
   already running stay; nothing is swapped out to switch.
3. Stage: copy in, ahead of time, the KV of the pooled requests next in line whose KV is on
   the host, within Bmax (`batch_kv_fraction`), so that refills do not wait on copies.
4. Give each member its decode token or the next chunk of its prefill under the token
   budget. A member is swapped out (its KV written back to the host) only when the device
   runs short of blocks; it is recomputed only when the host pool is full too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import islice

from alignedserve.scheduling.aligned_config import AlignedConfig, AlignedStats
from alignedserve.scheduling.block_manager import KVBlockManager, blocks_for
from alignedserve.scheduling.device_fit import DeviceFit
from alignedserve.scheduling.interface import (
    ScheduledChunk,
    SchedulerOutput,
    SchedulerStats,
    advance,
)
from alignedserve.scheduling.length_index import InMemoryLengthIndex, KVLengthIndex
from alignedserve.scheduling.lineup import Band, distance, line_up
from alignedserve.scheduling.request import FinishReason, Request, RequestStatus
from alignedserve.scheduling.staging import CandidateBuffer
from alignedserve.scheduling.swap import HostAllocator, KVSwapper
from alignedserve.scheduling.window_search import densest_window


class AlignedScheduler:
    """The aligned policy for one device. Same contract as FCFSScheduler, plus KV transfers."""

    def __init__(self, device: KVBlockManager, host: HostAllocator,
                 cfg: AlignedConfig | None = None, index: KVLengthIndex | None = None) -> None:
        self.cfg = cfg or AlignedConfig()
        self.swap = KVSwapper(device, host)
        self.device = device
        self.fit = DeviceFit(device, self.cfg)  # costs and room on the device
        self.index = index if index is not None else InMemoryLengthIndex()
        self.waiting: deque[Request] = deque()
        self.pooled: dict[str, Request] = {}
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = AlignedStats()
        self.steps = 0  # engine steps run: the starvation clock
        # id -> the step it first entered the pool: its aging clock's start (a member sent
        # back keeps it, so it waits no longer than had it never run)
        self._entered: dict[str, int] = {}
        self._hosted: dict[str, None] = {}  # pooled ids whose KV is in the host pool, in order
        self._band: Band | None = None  # the band a thin batch is being filled toward
        self._band_cache: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None
        self.requests_done = 0  # finished or aborted
        # the candidate-requests buffer: pooled requests whose KV is being copied in
        self.buffer = CandidateBuffer(
            self.swap, max(1, int(self.cfg.batch_kv_fraction * device.num_blocks)))
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
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def host_blocks_used(self) -> int:
        host = self.swap.host
        return host.num_blocks - host.num_free

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            running=len(self.running), waiting=len(self.waiting), pooled=len(self.pooled),
            device_usage=self.device.usage, host_blocks_used=self.host_blocks_used,
            batch_kv_lengths=tuple(r.num_tokens for r in self.running),
            counters={**vars(self.counters), **vars(self.swap.stats)})

    def transfers_done(self, seq: int) -> None:
        self.swap.transfers_done(seq)

    def schedule(self) -> SchedulerOutput:
        self._admit()
        switched = self._fill()
        self._stage()
        chunks, preempted = self._build_chunks()
        fence = (max((c.request.kv_ready_seq for c in chunks), default=0)
                 if self.swap.pending else 0)  # every copy done: nothing to wait for
        return SchedulerOutput(tuple(chunks), tuple(preempted), switched, self.swap.drain(),
                               fence if fence > self.swap.done_seq else 0)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        finished: list[Request] = []
        for req, reason in advance(out.chunks, sampled):
            self._finish(req, reason)
            finished.append(req)
        if out.chunks:
            self.steps += 1
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
            if not self.swap.hold_host(req, req.num_tokens):
                return
            self.waiting.popleft()
            self._to_pool(req)

    def _to_pool(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.pooled[req.request_id] = req
        self._entered.setdefault(req.request_id, self.steps)
        if req.num_computed_tokens:
            self._hosted[req.request_id] = None
        self.index.put(req.request_id, req.num_tokens)

    def _take(self, req: Request) -> None:
        del self.pooled[req.request_id]
        self._hosted.pop(req.request_id, None)
        self.index.remove(req.request_id)

    # -- batch level --------------------------------------------------------------------------

    def _running_band(self) -> Band:
        """The densest aligned range of the running members' lengths. Searched again when
        the membership changed; in between, every member grew by one token per step."""
        members = len(self.running), self.counters.refills, self.requests_done
        if self._band_cache is not None and self._band_cache[0] == members:
            lo, hi, at = self._band_cache[1]
            return lo + self.steps - at, hi + self.steps - at
        band = self._search_band()
        self._band_cache = members, (*band, self.steps)
        return band

    def _search_band(self) -> Band:
        lens = sorted(r.num_tokens for r in self.running)
        w = densest_window(lens, [1] * len(lens), min_batch=1, max_batch=len(lens),
                           max_spread=self.cfg.max_spread, budget=len(lens),
                           slack_tokens=self.cfg.slack_tokens)
        assert w is not None
        return lens[w.lo], lens[w.hi - 1]

    def _kmin(self) -> int:
        """Kmin, capped at what fits: how many of the pool's typical requests the device holds."""
        if not self.pooled:
            return self.cfg.min_batch
        sample = [self.fit.cost(r) for r in islice(self.pooled.values(), 16)]
        typical = sorted(sample)[len(sample) // 2]
        return max(1, min(self.cfg.min_batch, self.device.num_blocks // max(1, typical)))

    def _fill(self) -> bool:
        """Fill free slots and blocks from the pool (module doc, step 2). True when the band
        moved (a batch switch)."""
        slots = self.cfg.max_batch - len(self.running)
        if slots <= 0 or not self.pooled:
            return False
        n = len(self.running)
        thin = n < self.cfg.min_batch and n < self._kmin()
        had_members = n > 0
        if not thin:
            self._band = None
        room = self.fit.room(self.running)
        if room <= 0 and self.running:
            return False  # the device is full: nothing to rank
        band, switched = None if thin else self._running_band(), False
        if band is None:
            if self._band is None or not self.running:
                self._band = self._new_band(slots, room)
                switched = True
            band = self._band
        # Under per-sequence kernels ("longest") a long member's straggler is paid whether it
        # runs with this batch or later with fewer peers; when the whole pool fits there is
        # no choice to make, and holding it back would only leave room idle and push its
        # work later. (Under padded attention, "spread", it still waits for its peers.)
        fits = (self.cfg.align_by == "longest"
                and self.fit.all_fit(self.pooled.values(), slots, room))
        line = self._line_up(band, slots, force=fits)
        if not line and thin and not switched:  # the thin batch's band ran dry: move it
            self._band = band = self._new_band(slots, room)
            switched = True
            line = self._line_up(band, slots)
        if not line and not self.running:
            line = self._line_up(band, 1, force=True)  # an idle device always takes one
        line = self._split_first(line, slots, room)
        for r in line:
            cost = self.fit.to_take(r)
            if cost > room and self.running:
                break  # in order: the next in line waits for room rather than be skipped
            host_kv = bool(r.num_computed_tokens)
            self._take(r)
            hit = self.buffer.take(r.request_id)
            if not self.swap.swap_in(r):
                self._to_pool(r)
                break
            room -= cost
            r.status = RequestStatus.RUNNING
            self.running.append(r)
            self.counters.refills += 1
            self.counters.host_refills += host_kv
            self.counters.refill_hits += hit
            if not fits and distance(r.num_tokens, band, self.cfg):
                self.counters.starved += 1
        if switched:
            self.counters.batches += 1
            self.counters.switches += had_members
        return switched

    def _line_up(self, band: Band, limit: int, force: bool = False,
                 among: Iterable[str] | None = None) -> list[Request]:
        return line_up(self.pooled, self._entered, self.steps, band, self.cfg, limit,
                       force, among)

    def _split_first(self, line: list[Request], slots: int, room: int) -> list[Request]:
        """A kernel that splits members past `split_above_tokens` (vLLM's V2) runs a step
        holding one without a straggler: if neither the batch nor the head of `line` is that
        long, the shortest pooled one (any band takes it) goes first, if it fits `room`."""
        cut = self.cfg.split_above_tokens
        if (cut is None or self.cfg.align_by != "longest" or not line
                or line[0].num_tokens > cut or any(r.num_tokens > cut for r in self.running)):
            return line
        found = self.index.shortest_above(cut)
        if found is None:
            return line
        split = self.pooled[found[1]]
        if self.running and self.fit.to_take(split) > room:
            return line
        return [split, *(r for r in line if r is not split)][:slots]

    def _new_band(self, slots: int, room: int) -> Band:
        """Where a thin batch's band moves: the densest aligned group of the most overdue
        pooled requests (all of the pool when none is overdue), that fits `room` blocks."""
        horizon = self.cfg.max_wait_steps
        level = {rid: (self.steps - self._entered[rid]) // horizon for rid in self.pooled}
        top = max(level.values())
        items = [(n, rid) for n, rid in self.index.sorted_items() if level[rid] == top]
        lengths = [n for n, _ in items]
        costs = [self.fit.cost(self.pooled[rid]) for _, rid in items]
        w = densest_window(lengths, costs, min_batch=self._kmin(), max_batch=slots,
                           max_spread=self.cfg.max_spread,
                           budget=max(1, room), slack_tokens=self.cfg.slack_tokens)
        lo, hi = (w.lo, w.hi) if w is not None else (0, 1)
        return lengths[lo], lengths[hi - 1]

    def _stage(self) -> None:
        """Keep the candidate-requests buffer (`staging`) on the host-resident pooled
        requests next in line."""
        if self.cfg.refill_buffer == 0 or not self.running or not self._hosted:
            self.buffer.drop()
            return
        band = self._band or self._running_band()
        line = self._line_up(band, self.cfg.refill_buffer, among=list(self._hosted))
        self.buffer.refresh(line, self.fit.room(self.running), self.fit.cost)

    # -- one step -----------------------------------------------------------------------------

    def _build_chunks(self) -> tuple[list[ScheduledChunk], list[str]]:
        # Runs once per step over every member: the properties it reads are inlined.
        left = self.cfg.max_num_batched_tokens  # the step's token budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        # Decodes first, prefills last: prefills then never starve decodes of budget, and
        # preemption (from the end) hits the least-invested members. (A stable partition:
        # the members sorted by "has more than one token to compute".)
        running = self.running
        rest = [r for r in running if len(r.token_ids) - r.num_computed_tokens > 1]
        if rest:
            running[:] = [r for r in running
                          if len(r.token_ids) - r.num_computed_tokens <= 1] + rest
        grow = self.device.try_grow
        disorder = prefill = False  # whether a prefill chunk precedes a decode chunk
        i = 0
        while i < len(running):
            req = running[i]
            n = min(len(req.token_ids) - req.num_computed_tokens, left)
            left -= n
            if n == 0:
                i += 1
                continue  # no budget left for this prefill; it stays and waits a step
            while not grow(req, n):
                if self.buffer:  # prefetched refills yield their blocks before members do
                    self.buffer.drop()
                    continue
                victim = self.running.pop()
                if not self._swap_out(victim):
                    preempted.append(victim.request_id)
                self.counters.preemptions += 1
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                left += n  # given back
                continue
            start = req.num_computed_tokens
            chunks.append(ScheduledChunk(req, start, n))
            if n == 1 and start > 0:  # is_decode
                disorder = disorder or prefill
            else:
                prefill = True
            i += 1
        if disorder:
            chunks.sort(key=lambda c: not c.is_decode)
        return chunks, preempted

    def _swap_out(self, req: Request) -> bool:
        """Send a member back to the pool. False when its KV was dropped (recompute)."""
        if req in self.running:
            self.running.remove(req)
        kept = self.swap.swap_out(req)
        if not kept:
            self.swap.drop_device(req)
            req.num_computed_tokens = req.num_host_tokens = 0
            req.num_preemptions += 1
            self.counters.recomputes += 1
        self._to_pool(req)
        return kept

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.request_id in self.pooled:
            self._take(req)
            self.buffer.take(req.request_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        self.swap.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests_done += 1
        self._entered.pop(req.request_id, None)
        del self.requests[req.request_id]
