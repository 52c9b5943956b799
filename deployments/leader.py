"""The scheduler leader: one router replica at a time, elected through a Redis lock, runs the
global aligned batcher over the Redis decode index and assigns groups of requests with close
KV lengths to compute replicas (each replica then batches its own pool, with the same policy,
and its prefetch worker copies the KV in ahead of time).

Election: `SET leader <token> NX PX ttl`; the holder renews every tick with a compare-and-
expire script; if it dies, the key expires and another router's next tick takes it.
Dispatch: for each live replica with free room (its published state), take the densest
window of the decode index (`densest_window`, the policy's own search) up to that room; a
request is claimed by whoever removes it from the sorted set (ZREM returns 1), so a racing
abort and a dispatch never both hold it.
"""

from __future__ import annotations

import threading
import time
import uuid

import redis

from alignedserve.global_queue.index import RedisQueueIndex
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.records import ReplicaState, is_aborted, load_states, set_holder
from alignedserve.scheduling.window_search import densest_window, nearest_fill

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
REPLICA_STALE_S = 5.0  # a replica whose state is older than this gets no new work


class LeaderLock:
    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self.r = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._renew = client.register_script(_RENEW)

    def hold(self) -> bool:
        """Acquire or renew; True while this process is the leader."""
        if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            return True
        return bool(self.r.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def release(self) -> None:
        if self.r.get(self.key) == self.token.encode():
            self.r.delete(self.key)


class Dispatcher:
    """One tick: give every replica with room an aligned group from the decode index."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, max_spread: float,
                 slack_tokens: int, free_kv: object | None = None,
                 max_queue_delay_s: float = 10.0) -> None:
        self.r = client
        self.keys = keys
        self.index = RedisQueueIndex(client, keys)
        self.max_spread = max_spread
        self.slack_tokens = slack_tokens
        self.free_kv = free_kv  # callable(request_id): frees an aborted request's store KV
        self.dispatched = 0
        self.max_queue_delay_s = max_queue_delay_s
        self._seen: dict[str, float] = {}  # request id -> when this leader first saw it

    def live_replicas(self) -> list[ReplicaState]:
        now = time.time()
        return [s for s in load_states(self.r, self.keys) if now - s.ts < REPLICA_STALE_S]

    def tick(self) -> int:
        """Assign what fits; returns the number of requests assigned."""
        replicas = sorted(self.live_replicas(), key=lambda s: -s.free)
        if not replicas or replicas[0].free <= 0:
            return 0
        items = self.index.sorted_items()
        now = time.monotonic()
        self._seen = {rid: self._seen.get(rid, now) for _, rid in items}
        moved = 0
        for rep in replicas:
            if not items or rep.free <= 0:
                break
            group = self._pick(items, rep.free, now)
            moved += self._assign(rep.replica, [rid for _, rid in group])
            taken = {rid for _, rid in group}
            items = [it for it in items if it[1] not in taken]
        self.dispatched += moved
        return moved

    def _pick(self, items: list[tuple[int, str]], room: int,
              now: float) -> list[tuple[int, str]]:
        """The densest aligned window; around the oldest request once it has waited
        max_queue_delay_s (starvation bound at the global level)."""
        if len(items) <= room:
            return items
        lengths = [n for n, _ in items]
        oldest = min(range(len(items)), key=lambda i: self._seen[items[i][1]])
        if now - self._seen[items[oldest][1]] >= self.max_queue_delay_s:
            near = nearest_fill(lengths, [1] * len(items), lengths[oldest], room, room)
            return [items[i] for i in sorted(near)]
        w = densest_window(lengths, [1] * len(items), min_batch=1, max_batch=room,
                           max_spread=self.max_spread, budget=room,
                           slack_tokens=self.slack_tokens)
        return items[w.lo:w.hi] if w is not None else items[:room]

    def _assign(self, replica: str, rids: list[str]) -> int:
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            pipe.zrem(self.keys.decode, rid)
        claimed = [rid for rid, ok in zip(rids, pipe.execute(), strict=True) if ok]
        live = []
        for rid, dead in zip(claimed, is_aborted(self.r, self.keys, claimed), strict=True):
            if dead and self.free_kv is not None:
                self.free_kv(rid)
            elif not dead:
                live.append(rid)
        if live:
            pipe = self.r.pipeline(transaction=False)
            pipe.rpush(self.keys.inbox(replica), *live)
            for rid in live:  # who holds it now: the router's watchdog checks this replica
                set_holder(pipe, self.keys, rid, replica)
            pipe.execute()
        return len(live)


class LeaderLoop:
    """Background thread of a router replica: try to lead; while leading, dispatch."""

    def __init__(self, redis_url: str, keys: RedisKeys, ttl_s: float, max_spread: float,
                 slack_tokens: int, free_kv: object | None = None,
                 max_queue_delay_s: float = 10.0, tick_s: float = 0.005) -> None:
        self.r = redis.Redis.from_url(redis_url)
        self.lock = LeaderLock(self.r, keys.leader, ttl_s)
        self.dispatcher = Dispatcher(self.r, keys, max_spread, slack_tokens, free_kv,
                                     max_queue_delay_s)
        self.tick_s = tick_s
        self.ttl_s = ttl_s
        self.is_leader = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader", daemon=True)

    def start(self) -> LeaderLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        renew_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= renew_at or not self.is_leader:
                try:
                    self.is_leader = self.lock.hold()
                except redis.RedisError:
                    self.is_leader = False
                renew_at = now + self.ttl_s / 3
            if not self.is_leader:
                self._stop.wait(self.ttl_s / 3)
                continue
            try:
                moved = self.dispatcher.tick()
            except redis.RedisError:
                moved = 0
            if not moved:
                self._stop.wait(self.tick_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.is_leader:
            self.lock.release()
