"""The scheduler leader: one router replica at a time, elected through a Redis lock, runs the
global aligned batcher over the Redis decode index and assigns groups of requests with close
KV lengths to compute replicas (each replica then batches its own pool, with the same policy,
and its prefetch worker copies the KV in ahead of time).

Election: `SET leader <token> NX PX ttl`; the holder renews every tick with a compare-and-
expire script; if it dies, the key expires and another router's next tick takes it.
Dispatch: the live replicas with free room (their published states, minus those on nodes
cordoned for decode) and the decode index, each request with the node whose store holds its
KV, go through `plan_dispatch` (scheduling/dispatch.py); `assign` moves each request from the
index to a replica's inbox in one Redis script (whoever removes it from the index holds it,
so a racing abort and a dispatch never both hold it, and a leader dying mid-way drops
nothing).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from alignedserve.global_queue.connection import connect
from alignedserve.global_queue.index import RedisQueueIndex
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.nodes import cordoned
from alignedserve.global_queue.records import ReplicaState, abort, assign, load_states
from alignedserve.scheduling.dispatch import DispatchKnobs, Queued, Room, plan_dispatch

FreeKV = Callable[[str, str], object]  # (request id, node of its KV): free it there

log = logging.getLogger("alignedserve.leader")

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
REPLICA_STALE_S = 5.0  # a replica whose state is older than this gets no new work
ROUTER_DEAD_S = 10.0  # a router whose heartbeat is this old is dead: its requests abort
# A replica state this old is forgotten with its inbox (every request it held has long
# been resumed by then: routers act within replica_timeout_s).
REPLICA_FORGET_S = 300.0


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
    """One tick: give every replica with room an aligned group from the decode index, by
    the policy in `scheduling/dispatch.py` (clocks from the requests' arrival times)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, knobs: DispatchKnobs,
                 free_kv: FreeKV | None = None) -> None:
        self.r = client
        self.keys = keys
        self.index = RedisQueueIndex(client, keys)
        self.knobs = knobs
        self.free_kv = free_kv  # frees an aborted request's store KV
        self.dispatched = 0
        self.cordoned: set[str] = set()  # nodes whose replicas get nothing new (refreshed
        # by the leader loop about once a second)
        self._nodes: dict[str, str] = {}  # queued request id -> node of its KV

    def live_replicas(self) -> list[ReplicaState]:
        now = time.time()
        return [s for s in load_states(self.r, self.keys) if now - s.ts < REPLICA_STALE_S]

    def tick(self) -> int:
        """Assign what fits; returns the number of requests assigned."""
        queued = self.index.queued()
        if not queued:  # replicas that prefill claim their prompts themselves: often empty
            self._nodes.clear()  # (ids aborted while queued leave without a plan)
            return 0
        rooms = [Room(s.replica, s.free, s.node) for s in self.live_replicas()
                 if s.free > 0 and s.node not in self.cordoned]
        if not rooms:
            return 0
        plan = plan_dispatch(self._located(queued), rooms, self.knobs, time.time())
        moved = sum(self._assign(replica, rids) for replica, rids in plan)
        self.dispatched += moved
        return moved

    def _located(self, queued: list[Queued]) -> list[Queued]:
        """`queued` with the node holding each one's KV (read once per request: it does
        not move while the request is queued)."""
        new = [q.request_id for q in queued if q.request_id not in self._nodes]
        if new:
            pipe = self.r.pipeline(transaction=False)
            for rid in new:
                pipe.hget(self.keys.req(rid), "node")
            for rid, node in zip(new, pipe.execute(), strict=True):
                self._nodes[rid] = node.decode() if node is not None else ""
        self._nodes = {q.request_id: self._nodes[q.request_id] for q in queued}
        return [Queued(q.request_id, q.kv_len, q.arrival_time, self._nodes[q.request_id])
                for q in queued]

    def _assign(self, replica: str, rids: list[str]) -> int:
        moved, aborted = assign(self.r, self.keys, replica, rids)
        for rid in rids:  # out of the index; back only if resumed, maybe elsewhere
            self._nodes.pop(rid, None)
        for rid, node in aborted:  # aborted while queued: its KV is the leader's to free
            if self.free_kv is not None:
                self.free_kv(rid, node)
        return moved


def sweep_dead_routers(client: redis.Redis, keys: RedisKeys, free_kv: FreeKV | None,
                       now: float) -> int:
    """Abort the open requests of routers whose heartbeat stopped (their clients' connections
    died with them) and free their KV; returns how many were aborted."""
    n = 0
    for router, ts in client.hgetall(keys.routers).items():
        if now - float(ts) < ROUTER_DEAD_S:
            continue
        rids = [x.decode() for x in client.smembers(keys.routed(router.decode()))]
        for rid in rids:
            node = abort(client, keys, rid)
            if node is not None and free_kv is not None:
                free_kv(rid, node.decode())
        client.delete(keys.routed(router.decode()))
        client.hdel(keys.routers, router)
        if rids:
            log.warning("router %s is dead: aborted its %d open requests", router.decode(),
                        len(rids))
        n += len(rids)
    return n


def forget_dead_replicas(client: redis.Redis, keys: RedisKeys, now: float) -> list[str]:
    """Drop the states and inboxes of replicas silent for REPLICA_FORGET_S (each replica
    has a fresh id, so a churning deployment would otherwise collect them forever)."""
    gone = [s.replica for s in load_states(client, keys) if now - s.ts >= REPLICA_FORGET_S]
    if gone:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(keys.replicas, *gone)
        pipe.delete(*(keys.inbox(r) for r in gone))
        pipe.execute()
        log.info("forgot dead replicas %s", ", ".join(gone))
    return gone


class LeaderLoop:
    """Background thread of a router replica: send this router's heartbeat; try to lead;
    while leading, dispatch, and clean up after dead routers."""

    def __init__(self, redis_url: str, keys: RedisKeys, ttl_s: float, knobs: DispatchKnobs,
                 free_kv: FreeKV | None = None,
                 tick_s: float = 0.005, idle_s: float = 0.5, outage_s: float = 60.0,
                 router_id: str | None = None) -> None:
        self.r = connect(redis_url, outage_s)
        self.keys = keys
        self.router_id = router_id
        self.free_kv = free_kv
        self.lock = LeaderLock(self.r, keys.leader, ttl_s)
        self.dispatcher = Dispatcher(self.r, keys, knobs, free_kv)
        self.tick_s = tick_s  # after a Redis error, before trying again
        self.idle_s = idle_s  # a tick that moved nothing waits this long for a wake-up
        self.ticks = 0
        self.ttl_s = ttl_s
        self.is_leader = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leader", daemon=True)

    def start(self) -> LeaderLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        renew_at = 0.0
        failing = False  # log a Redis failure once, and its recovery once
        while not self._stop.is_set():
            now = time.monotonic()
            moved = 0
            try:
                if now >= renew_at or not self.is_leader:
                    self._set_leader(self.lock.hold())
                    renew_at = now + self.ttl_s / 3
                    if self.router_id is not None:
                        self.r.hset(self.keys.routers, self.router_id, repr(time.time()))
                    if self.is_leader:
                        self.dispatcher.cordoned = cordoned(self.r, self.keys, "decode")
                        sweep_dead_routers(self.r, self.keys, self.free_kv, time.time())
                        forget_dead_replicas(self.r, self.keys, time.time())
                if self.is_leader:
                    moved = self.dispatcher.tick()
                    self.ticks += 1
                if failing:
                    log.info("leader loop: Redis reachable again")
                    failing = False
            except redis.RedisError as e:
                if not failing:
                    log.warning("leader loop: Redis unavailable (%s); not leading until it "
                                "answers", e)
                    failing = True
                self._set_leader(False)
            if not self.is_leader:
                self._stop.wait(self.ttl_s / 3)
            elif not moved:  # never past the lock's renewal: a short TTL must not lapse
                self._wait_for_work(min(self.idle_s, renew_at - time.monotonic()))

    def _wait_for_work(self, timeout_s: float) -> None:
        """Until an index insert or a replica's new state wakes the dispatch, or
        `timeout_s` (the starvation clocks and cordons still move): no polling while
        nothing changes."""
        try:
            self.r.blpop([self.keys.wake], timeout=max(0.01, timeout_s))
        except redis.RedisError:
            self._stop.wait(self.tick_s)

    def _set_leader(self, leading: bool) -> None:
        if leading != self.is_leader:
            log.info("this router %s the scheduler leader", "is now" if leading else "is no "
                     "longer")
        self.is_leader = leading

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.is_leader:
            self.lock.release()
        if self.router_id is not None:
            self.r.hdel(self.keys.routers, self.router_id)
