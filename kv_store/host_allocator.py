"""The node's KV store as a compute replica's `HostAllocator`.

The store owns host capacity and knows blocks by (request id, block index); a replica's
scheduler reserves and releases through it. A swap-out's reservation is one Ray call that
the step waits for (it needs the block ids now). Admission's (`reserve_ahead`) does not
wait: it is sent, counted against the free-block hint at once, and its ids are filled in
when the store answers, checked every step. Before, the decode loop spent about a tenth
of its time in that round trip under load (BENCHMARKS.md, fourteenth session).

Frees are deferred: a release may follow a swap-out whose copy into those host blocks is
still queued at the prefetch worker, and the store could hand the blocks to a prefill at
once. So a release waits until every transfer submitted by then has finished.
"""

from __future__ import annotations

import time
from collections import deque

import ray
from ray.actor import ActorHandle

# How often the free-block count is asked of the store. Between answers, this replica's
# own reservations and frees are counted locally; the poll catches other clients'.
_STATS_EVERY_S = 1.0


class StoreHostAllocator:
    def __init__(self, store: ActorHandle, num_blocks: int) -> None:
        self.store = store  # Ray handle of the node's KVStore actor
        self.num_blocks = num_blocks
        self._free = num_blocks
        self._free_at = 0.0
        self._asked: ray.ObjectRef | None = None  # a stats call not answered yet
        self._releasing: list[tuple[str, int]] = []  # (owner, blocks) since the last submit
        self._deferred: deque[tuple[int, list[tuple[str, int]]]] = deque()  # (seq, releases)
        # reserve_ahead calls not answered yet: owner -> (call, the owner's held list, blocks
        # counted against the hint).
        self._ahead: dict[str, tuple[ray.ObjectRef, list[int], int]] = {}
        self.ahead_refused = 0  # reserve_ahead calls the store could not grant after all

    @property
    def num_free(self) -> int:
        """Free store blocks as of the store's last answer, asked for again at most every
        second and kept up to date with this replica's own reservations and frees (admission
        uses it as a hint; the store is the authority). Never waits: the decode loop reads
        it every step, and a blocking call there stalls the step. Settles the
        `reserve_ahead` calls the store has answered."""
        self._settle_answered()
        if self._asked is not None and ray.wait([self._asked], timeout=0)[0]:
            st, self._asked = ray.get(self._asked), None
            outstanding = sum(counted for _, _, counted in self._ahead.values())
            self._free = st.num_blocks - st.used_blocks - outstanding
        now = time.monotonic()
        if self._asked is None and now - self._free_at > _STATS_EVERY_S:
            self._asked, self._free_at = self.store.stats.remote(), now
        return self._free

    def reserve(self, owner: str, held: list[int], total: int) -> bool:
        self._settle(owner)
        if total <= len(held):
            return True
        got = ray.get(self.store.allocate.remote(owner, total))
        if got is None:
            return False
        self._free -= len(got) - len(held)
        held[:] = got
        return True

    def reserve_ahead(self, owner: str, held: list[int], total: int) -> bool:
        """Reserve without waiting when the free-block hint has room: True at once, and
        `held` gets its ids when the store answers (a later `reserve` or `release` of the
        owner waits for that answer first). Where the hint has no room, the store decides
        now, as `reserve`. If the store refuses after all (other clients took the room
        since the hint), `held` stays as it was: the request is admitted without host
        blocks, and a swap-out reserves again (`reserve`) or recomputes, as when the host
        pool is full."""
        need = total - len(held)
        if need <= 0 or owner in self._ahead or need > self._free:
            return self.reserve(owner, held, total)
        ref = self.store.allocate.remote(owner, total)
        self._ahead[owner] = (ref, held, need)
        self._free -= need
        return True

    def _settle(self, owner: str) -> None:
        """Wait for `owner`'s reserve_ahead answer, if one is outstanding, and apply it."""
        if owner in self._ahead:
            self._apply(owner, ray.get(self._ahead[owner][0]))

    def settle_all(self) -> None:
        """Wait for every outstanding reserve_ahead answer: before freeing requests'
        blocks in the store directly (a stopping replica), which must not overtake them."""
        for owner in list(self._ahead):
            self._settle(owner)

    def _settle_answered(self) -> None:
        if not self._ahead:
            return
        owner_of = {call[0]: owner for owner, call in self._ahead.items()}
        ready, _ = ray.wait(list(owner_of), num_returns=len(owner_of), timeout=0)
        for ref in ready:
            self._apply(owner_of[ref], ray.get(ref))

    def _apply(self, owner: str, got: list[int] | None) -> None:
        _, held, counted = self._ahead.pop(owner)
        if got is None:
            self._free += counted
            self.ahead_refused += 1
        else:
            held[:] = got

    def release(self, owner: str, held: list[int]) -> None:
        # The store runs calls concurrently: a free must not overtake its allocate.
        self._settle(owner)
        self._releasing.append((owner, len(held)))
        held.clear()

    def flush(self, submitted_seq: int, done_seq: int) -> None:
        """Call after each transfer submit: frees releases whose transfers have all run."""
        if self._releasing:
            self._deferred.append((submitted_seq, self._releasing))
            self._releasing = []
        while self._deferred and self._deferred[0][0] <= done_seq:
            for owner, blocks in self._deferred.popleft()[1]:
                self.store.free.remote(owner)
                self._free += blocks
