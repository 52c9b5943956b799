"""The node's host KV store as a Ray actor: one per node, named so every process on the node
finds it. `KVStoreCore` (core.py) is the store itself; clients on the node map the arena
(`KVStoreClient`) and copy blocks directly, calling the actor only to allocate and free.
Clients on other nodes use the gRPC service (`grpc_service.py`), which the actor starts.
When the arena is full, callers wait (`allocate_wait`): admission blocks, nothing drops.
"""

from __future__ import annotations

import threading
import time
import uuid

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from alignedserve.kv_store.core import KVStoreCore, KVStoreStats
from alignedserve.kv_store.grpc_service import RunningServer, start_server
from alignedserve.kv_store.shm_arena import ArenaSpec


class KVStoreActor:
    """The Ray actor: KVStoreCore behind a lock (Ray calls and gRPC threads share it)."""

    def __init__(self, spec_name: str, num_blocks: int, block_shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.core = KVStoreCore(spec_name, num_blocks, block_shape, dtype)
        self.lock = threading.Lock()
        self._grpc: RunningServer | None = None

    def spec(self) -> ArenaSpec:
        return self.core.spec()

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        with self.lock:
            return self.core.allocate(request_id, num_blocks)

    def free(self, request_id: str) -> int:
        with self.lock:
            return self.core.free(request_id)

    def blocks(self, request_id: str) -> list[int]:
        with self.lock:
            return self.core.blocks(request_id)

    def read(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        with self.lock:
            return self.core.read(request_id, block_indices)

    def write(self, request_id: str, block_indices: list[int], data: torch.Tensor) -> None:
        with self.lock:
            self.core.write(request_id, block_indices, data)

    def stats(self) -> KVStoreStats:
        with self.lock:
            return self.core.stats()

    def start_grpc(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve this store to other nodes; returns the bound port."""
        if self._grpc is None:
            self._grpc = start_server(self.core, self.lock, host, port)
        return self._grpc.port

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        """Stop gRPC and remove the arena (the deployment is going away)."""
        if self._grpc is not None:
            self._grpc.server.stop(grace=1)
            self._grpc = None
        with self.lock:
            self.core.close()


KVStore = ray.remote(num_cpus=0, max_concurrency=8)(KVStoreActor)


def store_name(node_id: str, prefix: str = "alignedserve") -> str:
    return f"{prefix}-kvstore-{node_id}"


def get_or_create_store(num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                        node_id: str | None = None,
                        namespace_prefix: str = "alignedserve",
                        wait: bool = True) -> ray.actor.ActorHandle:
    """The node's store actor, created on first use and pinned to the node. Detached, so it
    outlives whichever router or replica happened to create it; `close_stores` ends it.
    `wait=False` returns before it has started (its calls queue until it has), so the
    caller can start other actors meanwhile."""
    node = node_id or ray.get_runtime_context().get_node_id()
    name = store_name(node, namespace_prefix)
    handle = KVStore.options(
        name=name, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(f"as-kv-{node[:12]}-{uuid.uuid4().hex[:6]}", num_blocks, tuple(block_shape), dtype)
    if wait:
        ray.get(handle.ping.remote())
    return handle


def close_stores(namespace_prefix: str = "alignedserve") -> int:
    """Close and kill every live node's store actor (on shutdown); returns how many."""
    n = 0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        try:
            handle = ray.get_actor(store_name(node["NodeID"], namespace_prefix))
            ray.get(handle.close.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError):  # never created there, or gone
            continue
        ray.kill(handle)
        n += 1
    return n


class StoreDirectory:
    """Every node's store by node id, for the processes that free a request's KV wherever it
    is (routers, the scheduler leader). A free is a one-way Ray call; a store that is gone
    (its node died) has nothing left to free."""

    def __init__(self, namespace_prefix: str = "alignedserve") -> None:
        self.prefix = namespace_prefix
        self._handles: dict[str, ray.actor.ActorHandle] = {}

    def free(self, request_id: str, node: str) -> None:
        handle = self._handles.get(node)
        if handle is None:
            try:
                handle = self._handles[node] = ray.get_actor(store_name(node, self.prefix))
            except ValueError:  # no store on that node (any more)
                return
        handle.free.remote(request_id)


def allocate_wait(store: ray.actor.ActorHandle, request_id: str, num_blocks: int,
                  timeout_s: float, poll_s: float = 0.01) -> list[int]:
    """Allocate, waiting (with backoff up to 0.2 s) while the store is full; tries at least
    once. Raises TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = poll_s
    while True:
        got = ray.get(store.allocate.remote(request_id, num_blocks))
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"KV store full: {num_blocks} blocks for {request_id!r} "
                               f"not available within {timeout_s} s")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(0.2, delay * 2)
