"""Core sharing inside a pair: a compute replica and its prefetch worker share the node's
cores instead of each owning a fixed part.

Each side says whether it is busy in the device arena's shared header (one int64 slot each,
no RPC) and reads the other's before every step. A side whose partner is idle computes on
`pair_threads` (the decode tail with no prompt to prefill; a burst with nothing to decode
yet). While both are busy, `mode` decides:
- "split" (default): both compute at once, each on its own thread count
  (`replica_threads`, `worker_threads`).
- "alternate": the two take turns, one step each, every step on `pair_threads` (a turn
  slot in the header says whose step is next). A prefill step and a decode step then run
  one after the other on the whole machine, as in a colocated engine that mixes both in
  one step (vLLM), but each step's batch stays pure. On 2 cores shared with the router,
  the proxy and Redis this halves TTFT but loses throughput and doubles TPOT (two-thread
  steps stall whenever another process takes a core), so it is not the default.
A side that turns busy while the other is mid-step overlaps that one step at most; a side
that waits longer than `max_wait_s` for its turn (its partner died mid-turn) goes ahead.

Priority: Ray starts its workers at nice 15, below Redis, the GCS and the dashboard agent
(nice 0). A multi-threaded step waits at every op's barrier for its slowest thread, so each
time one of those preempts a compute thread the whole step stalls. Before its first step a
side sets its computing thread to `nice` (ServeConfig.compute_nice), so the OpenMP threads
that thread starts inherit it; lowering nice needs CAP_SYS_NICE, and without it the side
keeps Ray's and logs why once.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

from alignedserve.niceness import set_thread_nice

HEADER_REPLICA_BUSY = 1  # device-arena header slot: the replica has requests to decode
HEADER_WORKER_BUSY = 2  # device-arena header slot: the worker has prompts to prefill
HEADER_TURN = 3  # device-arena header slot: the busy slot of the side whose step is next
_POLL_S = 0.0002  # header poll while waiting for the turn


class CoreShare:
    def __init__(self, header: torch.Tensor, mine: int, other: int, own_threads: int,
                 pair_threads: int, mode: Literal["split", "alternate"] = "split",
                 max_wait_s: float = 5.0, nice: int | None = None) -> None:
        self.header = header  # int64 view over the device arena's header
        self.mine, self.other = mine, other
        self.own_threads = own_threads  # split: while the other side is busy
        self.pair_threads = max(pair_threads, own_threads)  # while it is idle
        self.mode = mode
        self.max_wait_s = max_wait_s
        self._busy: bool | None = None
        self.threads = 0  # torch threads set on the calling thread, 0 before the first step
        self.waited_s = 0.0  # time spent waiting for the turn
        self.nice = nice  # the computing thread's niceness; None: leave it as it is

    def set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.header[self.mine] = int(busy)

    def before_step(self) -> int:
        """Mark this side busy, wait for its turn (alternate), and size torch's thread pool;
        call on the thread that computes (torch's OpenMP setting is per thread)."""
        self.set_busy(True)
        if self.mode == "alternate":
            self._wait_turn()
            want = self.pair_threads
        else:
            want = self.own_threads if int(self.header[self.other]) else self.pair_threads
        if self.threads == 0 and self.nice is not None:
            set_thread_nice(self.nice, "compute thread")
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
        return want

    def after_step(self) -> None:
        """Hand the turn to the other side (alternate)."""
        if self.mode == "alternate":
            self.header[HEADER_TURN] = self.other

    def _wait_turn(self) -> None:
        t0 = time.monotonic()
        while (int(self.header[self.other]) and int(self.header[HEADER_TURN]) == self.other
               and time.monotonic() - t0 < self.max_wait_s):
            time.sleep(_POLL_S)
        self.waited_s += time.monotonic() - t0
