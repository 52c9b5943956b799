"""The compute replica's liveness: the state it publishes, its heartbeat and how it fails
(`ComputeReplica`).

The decode loop refreshes the replica's state (its room for more requests, pool sizes,
usage) every STATE_EVERY_S, on its own thread, which owns the scheduler. A heartbeat
thread publishes the decode loop's latest state every 0.25 s, and at once when
the loop reports that the replica's room moved (the leader's dispatch waits on that), and
pings the prefetch worker: if the worker died, the replica withdraws its state (the routers resume
its requests elsewhere at once) and fails its health check, so Serve replaces the pair.
About once a second it also publishes its node's store (`StoreInfo`: gRPC address, usage).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import ray
import redis

from alignedserve.config import ServeConfig
from alignedserve.engine.llm_engine import LLMEngine
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.nodes import StoreInfo, publish_store
from alignedserve.global_queue.records import ReplicaState, RequestRecord, publish_state
from alignedserve.prefetch_workers.transfer_client import PrefetchTransferQueue

log = logging.getLogger("alignedserve.replica")
STATE_EVERY_S = 0.1  # how often the decode loop refreshes the state the heartbeat sends
# How often the heartbeat publishes the state when nothing nudges it: routers look closer at
# a replica whose state is a second old (deployments/liveness.py), so 4 beats fit in that.
# It was 0.1 s; each beat is a Redis round trip on a thread that contends for the GIL with
# the decode loop.
HEARTBEAT_S = 0.25
_PING_WORKER_EVERY_S = 0.5
_STORE_EVERY_S = 1.0  # how often the node's store info is refreshed in Redis


class ReplicaLiveness:
    """The state and heartbeat half of `ComputeReplica`; these are the attributes it reads."""

    cfg: ServeConfig
    engine: LLMEngine
    transfers: PrefetchTransferQueue
    pulling: dict[str, tuple[ray.ObjectRef, RequestRecord]]
    replica_id: str
    node: str
    store_address: str
    r: redis.Redis
    keys: RedisKeys
    worker: ray.actor.ActorHandle
    store: ray.actor.ActorHandle
    _stop: threading.Event
    _error: BaseException | None
    _last_state: ReplicaState
    _state_at: float  # when the decode loop last refreshed _last_state
    _draining: threading.Event
    _actors: tuple[str, str]
    _namespace: str
    _pids: tuple[int, int]
    _beat: threading.Event  # set by the decode loop: publish now (the room moved)

    _published_free: int | None = None  # the room last published

    def _state(self) -> ReplicaState:
        st = self.engine.scheduler.stats()
        return ReplicaState(
            replica=self.replica_id, ts=time.time(), requests=self.engine.num_requests,
            running=st.running, pooled=st.pooled, waiting=st.waiting,
            free=self._room(),
            kv_usage=st.device_usage, prefetch_hit_rate=self.transfers.hit_rate,
            switches=st.counters["switches"],
            prefill="replica" if self.cfg.replica_prefills else "worker",
            node=self.node, actors=self._actors,
            namespace=self._namespace, pids=self._pids,
        )

    def _room(self) -> int:
        """Requests the leader may still assign here."""
        if self._draining.is_set():
            return 0
        return max(0, self.cfg.replica_inflight - self.engine.num_requests - len(self.pulling))

    def _publish_state(self) -> None:
        """Refresh the state the heartbeat publishes (computed here, on the loop's thread,
        which owns the scheduler) every STATE_EVERY_S, and at once, with a nudge to the
        heartbeat, when the room moved."""
        now = time.monotonic()
        moved = self._room() != self._last_state.free
        if not moved and now - self._state_at < STATE_EVERY_S:
            return
        self._state_at = now
        self._last_state = self._state()
        if moved:
            self._beat.set()

    def _publish_now(self) -> None:
        """Publish the latest state with a fresh timestamp. The leader's dispatch is woken
        only when the replica's room moved: a heartbeat alone has nothing for it."""
        state = dataclasses.replace(self._last_state, ts=time.time())
        wake, self._published_free = state.free != self._published_free, state.free
        publish_state(self.r, self.keys, state, wake=wake)

    def _heartbeat(self) -> None:
        """Publish the decode loop's latest state with a fresh timestamp every HEARTBEAT_S,
        or sooner when nudged (the routers take a replica that stops as dead), and watch
        the prefetch worker."""
        ping: ray.ObjectRef | None = None
        stats: ray.ObjectRef | None = None
        pinged = stats_at = 0.0
        while True:
            self._beat.wait(HEARTBEAT_S)
            self._beat.clear()
            if self._stop.is_set():
                return
            try:
                if ping is None and time.monotonic() - pinged > _PING_WORKER_EVERY_S:
                    ping, pinged = self.worker.ping.remote(), time.monotonic()
                if ping is not None and ray.wait([ping], timeout=0)[0]:
                    ray.get(ping)  # raises once the worker is dead (or has failed)
                    ping = None
                if stats is None and time.monotonic() - stats_at > _STORE_EVERY_S:
                    stats, stats_at = self.store.stats.remote(), time.monotonic()
                if stats is not None and ray.wait([stats], timeout=0)[0]:
                    st, stats = ray.get(stats), None
                    publish_store(self.r, self.keys, StoreInfo(
                        self.node, self.store_address, time.time(), st.num_blocks,
                        st.used_blocks, st.num_requests, st.bytes_read))
                self._publish_now()
            except ray.exceptions.RayError as e:
                self._fail(e)
                return
            except Exception:  # Redis gone past its outage allowance: keep trying
                log.exception("replica %s: heartbeat failed", self.replica_id)

    def _fail(self, e: BaseException) -> None:
        """The prefetch worker or the decode loop died: this pair can serve nothing more.
        Withdraw the state so routers resume the requests it held elsewhere now, and fail
        the health check so Serve replaces the pair."""
        log.error("replica %s failed (%r); its requests resume elsewhere", self.replica_id, e)
        self._error = e
        self._stop.set()
        self._beat.set()
        try:
            self.r.hdel(self.keys.replicas, self.replica_id)
        except Exception:  # Redis down too: the routers see the state go stale instead
            log.exception("replica %s: could not withdraw its state", self.replica_id)


def serve_store(store: ray.actor.ActorHandle, cfg: ServeConfig) -> str:
    """Start (once per node) the node's store's gRPC service, on `kv_grpc_host` or the
    node's own address as Ray knows it (never all interfaces by default); its address."""
    host = cfg.kv_grpc_host or ray.util.get_node_ip_address()
    port = ray.get(store.start_grpc.remote(host, cfg.kv_grpc_port))
    return f"{host}:{port}"
