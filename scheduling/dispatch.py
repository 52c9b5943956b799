"""The cluster's global dispatch: which queued requests go to which compute replica.

A pure function, so the scheduler leader (over the Redis decode index) and the simulator's
router run the same policy. Each replica with room gets the densest aligned window of the
queue (the same density-first search as a replica's own batcher), and requests outside it
join by the aligned policy's aging rule (`aging_score`: a request one band away joins after
`max_queue_delay_s`, two bands away after about twice that): the global starvation bound.
Clocks come from the requests' arrival times, which live in the request records, so a new
leader continues the same clocks.

Nodes (multi-node clusters): a request's KV sits in the store of the node whose prefetch
worker prefilled it (`Queued.node`); a replica on another node must first pull it over the
network. KV moves only to even out load, and only past a slack that a copy is worth:
1. shares: when the queue is shorter than the room, each replica's share is water-filled
   (the replicas with the most room get requests until every replica is left with the
   same room), so no node idles while another's pool fills;
2. each replica takes requests from its own node, up to its share plus `locality_slack`
   (a small imbalance costs less than a copy);
3. then, up to its share, requests other nodes' replicas left (a cross-node copy, which
   its prefetch worker runs while it decodes);
4. room left over (the queue's lengths did not fit the windows) is filled the same way,
   local first.
With every request and replica on one node (`node` ""), only the shares matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignedserve.scheduling.window_search import aging_score, band_distance, densest_window


@dataclass(frozen=True)
class Queued:
    """A decode-ready request in the global queue."""

    request_id: str
    kv_len: int  # tokens of KV it depends on (prompt + generated so far)
    arrival_time: float  # seconds on the caller's clock (the router's time.time())
    node: str = ""  # node whose KV store holds its KV ("" single-node or unknown)


@dataclass(frozen=True)
class Room:
    """A compute replica that may take requests."""

    replica: str
    free: int  # requests it may still be assigned
    node: str = ""  # node it runs on (its prefetch worker reads that node's KV store)


@dataclass(frozen=True)
class DispatchKnobs:
    max_spread: float  # longest / shortest KV length of an aligned group
    slack_tokens: int  # ... or longest - shortest up to this many tokens
    max_queue_delay_s: float  # aging horizon: one band of distance is forgiven per this wait
    locality_slack: int = 16  # requests a replica may take past its share to keep KV local
    align_by: str = "spread"  # AlignedKnobs.align_by, resolved (`dispatch_align_by`)

    def __post_init__(self) -> None:
        if self.align_by not in ("spread", "longest", "total"):
            raise ValueError(f"align_by {self.align_by!r}: resolve auto first "
                             "(dispatch_align_by)")


def dispatch_align_by(align_by: str, replica_gpus: float) -> str:
    """The global dispatch's `align_by`: auto resolves as the replicas' engines do. CPU
    replicas run the paged kernel, whose threads share a batch's work longest first
    (total); GPU replicas' engines pick dense or varlen attention by spread (spread; not
    exercised in CI)."""
    if align_by != "auto":
        return align_by
    return "spread" if replica_gpus > 0 else "total"


def plan_dispatch(queued: Sequence[Queued], rooms: Sequence[Room], knobs: DispatchKnobs,
                  now: float) -> list[tuple[str, list[str]]]:
    """(replica, request ids) assignments, at most one entry per replica. `queued` is
    sorted by kv_len ascending (ties in queue order); each request is assigned at most
    once, each replica at most `free`."""
    open_rooms = sorted((r for r in rooms if r.free > 0), key=lambda r: -r.free)
    items = list(queued)
    if not open_rooms or not items:
        return []
    shares = water_fill([r.free for r in open_rooms], len(items))
    slack = knobs.locality_slack if len({r.node for r in open_rooms}) > 1 else 0
    got: dict[str, list[str]] = {}
    for cap_of, local in ((lambda k: shares[k] + slack, True),
                          (lambda k: shares[k], False),
                          (lambda k: open_rooms[k].free, True),
                          (lambda k: open_rooms[k].free, False)):
        for k, room in enumerate(open_rooms):
            cap = min(cap_of(k), room.free) - len(got.get(room.replica, ()))
            if cap <= 0:
                continue
            idx = [i for i, q in enumerate(items) if (q.node == room.node) == local]
            if not idx:
                continue
            picked = [idx[j] for j in _pick([items[i] for i in idx], cap, knobs, now)]
            got.setdefault(room.replica, []).extend(items[i].request_id for i in picked)
            taken = set(picked)
            items = [q for i, q in enumerate(items) if i not in taken]
            if not items:
                return list(got.items())
    return list(got.items())


def water_fill(free: Sequence[int], n: int) -> list[int]:
    """How many of `n` requests each replica takes so that the room left is as even as it
    can be (`free` sorted descending; ties go to the earlier replica). Every replica takes
    all its room when `n` is at least the total."""
    def total(level: int) -> int:  # requests taken if every replica is filled down to level
        return sum(max(0, f - level) for f in free)

    lo, hi = 0, max(free, default=0)  # the lowest level whose total fits in n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if total(mid) <= n else (mid + 1, hi)
    shares = [max(0, f - lo) for f in free]
    extra = n - sum(shares) if lo > 0 else 0  # < replicas at the level: one more each
    for k, f in enumerate(free):
        if extra <= 0:
            break
        if f >= lo:
            shares[k] += 1
            extra -= 1
    return shares


def _pick(items: list[Queued], room: int, knobs: DispatchKnobs, now: float) -> list[int]:
    """Indices into `items` (ascending) of one replica's group: the densest aligned window,
    in the aligned policy's `aging_score` order (seconds since arrival over
    `max_queue_delay_s`). A request outside the window that has waited long enough for its
    distance comes first, and the group then forms around its length instead; a burst's
    requests, which wait alike, stay in length order."""
    if len(items) <= room:
        return list(range(len(items)))
    if knobs.align_by == "total":  # length costs the replicas' kernel nothing: oldest first
        return sorted(sorted(range(len(items)), key=lambda i: items[i].arrival_time)[:room])
    lengths = [q.kv_len for q in items]
    ones = [1] * len(items)
    w = densest_window(lengths, ones, min_batch=1, max_batch=room, max_spread=knobs.max_spread,
                       budget=room, slack_tokens=knobs.slack_tokens)
    lo, hi = (w.lo, w.hi) if w is not None else (0, 1)

    def ranked(band: tuple[int, int]) -> list[tuple[bool, float, int, int, float]]:
        """(outside the band, score, length, index, band distance), members first."""
        out = []
        for i, (n, q) in enumerate(zip(lengths, items, strict=True)):
            d = band_distance(n, *band, knobs.max_spread, knobs.slack_tokens, knobs.align_by)
            score = aging_score(d, now - q.arrival_time, knobs.max_queue_delay_s)
            out.append((not band[0] <= n <= band[1], score, n, i, d))
        return sorted(out)

    order = ranked((lengths[lo], lengths[hi - 1]))
    due = [t for t in order if t[4] > 0 and t[1] <= 0]
    if due:  # an overdue misaligned request: the group forms around the most overdue
        first = lengths[min(due, key=lambda t: t[1])[3]]
        order = sorted(ranked((first, first)), key=lambda t: (t[1], t[2]))
    return sorted(t[3] for t in order[:room] if t[1] <= 0)
