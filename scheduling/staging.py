"""The candidate-requests buffer: KV of pooled requests copied in ahead of their turn.

The aligned policy names who is next in line; the buffer starts their host -> device copies
within Bmax (its share of the device pool) and the device's spare blocks, so that a freed
slot is refilled without waiting on a copy. A staged request stays in the pool. One that
drops out of line, or whose blocks a running member needs, gives its device blocks back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from alignedserve.scheduling.request import Request
from alignedserve.scheduling.swap import KVSwapper


class CandidateBuffer:
    def __init__(self, swap: KVSwapper, bmax_blocks: int) -> None:
        self.swap = swap
        self.bmax = bmax_blocks
        self.staged: dict[str, Request] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.staged

    def __bool__(self) -> bool:
        return bool(self.staged)

    def refresh(self, line: list[Request], room: int, cost: Callable[[Request], int]) -> None:
        """Keep staged exactly the head of `line` that fits: unstage whoever left it, then
        stage its next requests while they fit Bmax and `room` (device blocks to spare)."""
        keep = {r.request_id for r in line}
        self.drop(k for k in list(self.staged) if k not in keep)
        spent = sum(cost(r) for r in self.staged.values())
        for r in line:
            if r.request_id in self.staged:
                continue
            c = cost(r)
            if spent + c > self.bmax or c > room or not self.swap.swap_in(r):
                return
            spent += c
            room -= c
            self.staged[r.request_id] = r

    def take(self, request_id: str) -> bool:
        """The request leaves the pool (it joins the batch or finishes); its device blocks,
        if staged, go with it. True when it was staged (a refill hit)."""
        return self.staged.pop(request_id, None) is not None

    def drop(self, ids: Iterable[str] | None = None) -> None:
        """Give back the device blocks of these staged requests (default: all of them)."""
        for k in list(self.staged) if ids is None else list(ids):
            self.swap.drop_device(self.staged.pop(k))
