"""Core sharing inside a pair: a compute replica and its prefetch worker each take the cores
the other leaves idle.

On a small node the pair has the whole machine (2 cores here): while the worker prefills,
each side computes on its own thread count (`replica_threads`, `worker_threads`); in the
decode tail, with the prefill queue empty, the replica takes `pair_threads`, and during a
burst with nothing to decode the worker does. Each side says whether it is busy in the
device arena's shared header (one int64 slot each, no RPC) and reads the other's before
every step. A side that turns busy mid-step overlaps the other's wider step for at most
that one step.
"""

from __future__ import annotations

import torch

HEADER_REPLICA_BUSY = 1  # device-arena header slot: the replica has requests to decode
HEADER_WORKER_BUSY = 2  # device-arena header slot: the worker has prompts to prefill


class CoreShare:
    def __init__(self, header: torch.Tensor, mine: int, other: int, own_threads: int,
                 pair_threads: int) -> None:
        self.header = header  # int64 view over the device arena's header
        self.mine, self.other = mine, other
        self.own_threads = own_threads  # while the other side is busy
        self.pair_threads = max(pair_threads, own_threads)  # while it is idle
        self._busy: bool | None = None
        self.threads = 0  # torch threads set on the calling thread, 0 before the first step

    def set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.header[self.mine] = int(busy)

    def before_step(self) -> int:
        """Mark this side busy and size torch's thread pool to what the other leaves free;
        call on the thread that computes (torch's OpenMP setting is per thread)."""
        self.set_busy(True)
        want = self.own_threads if int(self.header[self.other]) else self.pair_threads
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
        return want
