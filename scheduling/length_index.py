"""The KV-length index over decode-ready requests.

An interface with an in-memory implementation here; the serving layer adds a Redis
sorted-set implementation with the same methods. Lengths are KV lengths in tokens
(prompt + generated so far).
"""

from __future__ import annotations

import bisect
from typing import Protocol


class KVLengthIndex(Protocol):
    """Request ids ordered by KV length. Invariant: each id appears at most once."""

    def put(self, request_id: str, kv_len: int) -> None:
        """Insert or move `request_id` to `kv_len`."""
        ...

    def remove(self, request_id: str) -> bool:
        """Drop `request_id`; False if it was not present."""
        ...

    def sorted_items(self) -> list[tuple[int, str]]:
        """All (kv_len, request_id), ascending by length (ties by insertion order)."""
        ...

    def shortest_above(self, kv_len: int) -> tuple[int, str] | None:
        """The first of `sorted_items` longer than `kv_len`, if any."""
        ...

    def __len__(self) -> int: ...


class InMemoryLengthIndex:
    """A sorted list with bisect: O(log n) search, O(n) insert; fine for 10^4 entries."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int, str]] = []  # (kv_len, insertion seq, id)
        self._by_id: dict[str, tuple[int, int, str]] = {}
        self._seq = 0

    def put(self, request_id: str, kv_len: int) -> None:
        self.remove(request_id)
        self._seq += 1
        key = (kv_len, self._seq, request_id)
        bisect.insort(self._keys, key)
        self._by_id[request_id] = key

    def remove(self, request_id: str) -> bool:
        key = self._by_id.pop(request_id, None)
        if key is None:
            return False
        i = bisect.bisect_left(self._keys, key)
        del self._keys[i]
        return True

    def sorted_items(self) -> list[tuple[int, str]]:
        return [(n, rid) for n, _, rid in self._keys]

    def shortest_above(self, kv_len: int) -> tuple[int, str] | None:
        i = bisect.bisect_left(self._keys, (kv_len + 1,))
        return (self._keys[i][0], self._keys[i][2]) if i < len(self._keys) else None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._keys)
