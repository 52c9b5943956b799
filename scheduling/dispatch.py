"""The cluster's global dispatch: which queued requests go to which compute replica.

A pure function, so the scheduler leader (over the Redis decode index) and the simulator's
router run the same policy. Each replica with room gets the densest aligned window of the
queue (the same density-first search as a replica's own batcher), most room first; once
the oldest queued request has waited `max_queue_delay_s`, the next replica gets the
requests nearest to it in length instead (the global starvation bound). Clocks come from
the requests' arrival times, which live in the request records, so a new leader continues
the same clocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignedserve.scheduling.window_search import densest_window, nearest_fill


@dataclass(frozen=True)
class Queued:
    """A decode-ready request in the global queue."""

    request_id: str
    kv_len: int  # tokens of KV it depends on (prompt + generated so far)
    arrival_time: float  # seconds on the caller's clock (the router's time.time())


@dataclass(frozen=True)
class Room:
    """A compute replica that may take requests."""

    replica: str
    free: int  # requests it may still be assigned


@dataclass(frozen=True)
class DispatchKnobs:
    max_spread: float  # longest / shortest KV length of an aligned group
    slack_tokens: int  # ... or longest - shortest up to this many tokens
    max_queue_delay_s: float  # a request queued this long is served whatever its length


def plan_dispatch(queued: Sequence[Queued], rooms: Sequence[Room], knobs: DispatchKnobs,
                  now: float) -> list[tuple[str, list[str]]]:
    """(replica, request ids) assignments. `queued` is sorted by kv_len ascending (ties in
    queue order); each request is assigned at most once, each replica at most `free`."""
    items = list(queued)
    plan: list[tuple[str, list[str]]] = []
    for room in sorted(rooms, key=lambda r: -r.free):
        if not items or room.free <= 0:
            break
        picked = _pick(items, room.free, knobs, now)
        plan.append((room.replica, [items[i].request_id for i in picked]))
        taken = set(picked)
        items = [q for i, q in enumerate(items) if i not in taken]
    return plan


def _pick(items: list[Queued], room: int, knobs: DispatchKnobs, now: float) -> list[int]:
    """Indices into `items` (ascending) of one replica's group."""
    if len(items) <= room:
        return list(range(len(items)))
    lengths = [q.kv_len for q in items]
    ones = [1] * len(items)
    oldest = min(range(len(items)), key=lambda i: items[i].arrival_time)
    if now - items[oldest].arrival_time >= knobs.max_queue_delay_s:
        near = set(nearest_fill(lengths, ones, lengths[oldest], room, room))
        if oldest not in near:  # equal lengths queued earlier may crowd it out
            near.remove(max(near, key=lambda i: (abs(lengths[i] - lengths[oldest]), i)))
            near.add(oldest)
        return sorted(near)
    w = densest_window(lengths, ones, min_batch=1, max_batch=room, max_spread=knobs.max_spread,
                       budget=room, slack_tokens=knobs.slack_tokens)
    return list(range(w.lo, w.hi)) if w is not None else list(range(room))
