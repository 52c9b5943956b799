"""The node's KV store as a compute replica's `HostAllocator`.

The store owns host capacity and knows blocks by (request id, block index); a replica's
scheduler reserves and releases through it. Reservation is one Ray call, made only when a
request's host block list must grow (a swap-out of KV that grew since its last one).

Frees are deferred: a release may follow a swap-out whose copy into those host blocks is
still queued at the prefetch worker, and the store could hand the blocks to a prefill at
once. So a release waits until every transfer submitted by then has finished.
"""

from __future__ import annotations

import time
from collections import deque

import ray
from ray.actor import ActorHandle

_STATS_EVERY_S = 0.2  # how stale the cached free-block count may get


class StoreHostAllocator:
    def __init__(self, store: ActorHandle, num_blocks: int) -> None:
        self.store = store  # Ray handle of the node's KVStore actor
        self.num_blocks = num_blocks
        self._free = num_blocks
        self._free_at = 0.0
        self._asked: ray.ObjectRef | None = None  # a stats call not answered yet
        self._releasing: list[str] = []  # released since the last transfer submit
        self._deferred: deque[tuple[int, list[str]]] = deque()  # (submitted seq, owners)

    @property
    def num_free(self) -> int:
        """Free store blocks as of the store's last answer, asked for again at most every
        0.2 s (admission uses it as a hint; `reserve` is the authority). Never waits: the
        decode loop reads it every step, and a blocking call there stalls the step."""
        if self._asked is not None and ray.wait([self._asked], timeout=0)[0]:
            st, self._asked = ray.get(self._asked), None
            self._free = st.num_blocks - st.used_blocks
        now = time.monotonic()
        if self._asked is None and now - self._free_at > _STATS_EVERY_S:
            self._asked, self._free_at = self.store.stats.remote(), now
        return self._free

    def reserve(self, owner: str, held: list[int], total: int) -> bool:
        if total <= len(held):
            return True
        got = ray.get(self.store.allocate.remote(owner, total))
        if got is None:
            return False
        self._free -= len(got) - len(held)
        held[:] = got
        return True

    def release(self, owner: str, held: list[int]) -> None:
        self._releasing.append(owner)
        held.clear()

    def flush(self, submitted_seq: int, done_seq: int) -> None:
        """Call after each transfer submit: frees releases whose transfers have all run."""
        if self._releasing:
            self._deferred.append((submitted_seq, self._releasing))
            self._releasing = []
        while self._deferred and self._deferred[0][0] <= done_seq:
            for owner in self._deferred.popleft()[1]:
                self.store.free.remote(owner)
