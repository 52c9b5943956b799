"""The host KV store: the shared-memory arena across processes, the store's accounting, the
Ray actor with a same-node client, admission that waits, and the gRPC service on loopback."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import uuid

import psutil
import pytest
import torch

from alignedserve.kv_store.core import KVStoreCore
from alignedserve.kv_store.shm_arena import ArenaSpec, ShmArena

SHAPE = (2, 2, 4, 1, 8)  # [layers, K|V, block_size, kv_heads, head_dim]


def _name() -> str:
    return f"as-test-{uuid.uuid4().hex[:10]}"


def _child(spec: ArenaSpec, q) -> None:
    arena = ShmArena.attach(spec)
    q.put(float(arena.blocks[3].sum()))  # sees the parent's write
    arena.blocks[5].fill_(2.5)  # the parent sees this one
    arena.header[0] = 41
    arena.close()


def test_arena_is_shared_across_processes():
    arena = ShmArena.create(_name(), 8, SHAPE, torch.float32)
    try:
        assert float(arena.blocks.abs().sum()) == 0.0 and int(arena.header[:7].sum()) == 0
        assert int(arena.header[7]) == os.getpid()  # the owner, for remove_orphans
        arena.blocks[3].fill_(1.0)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(arena.spec, q))
        p.start()
        seen = q.get(timeout=60)
        p.join(timeout=60)
        assert p.exitcode == 0
        assert seen == float(torch.ones(SHAPE).sum())
        assert torch.equal(arena.blocks[5], torch.full(SHAPE, 2.5))
        assert int(arena.header[0]) == 41
        again = ShmArena.attach(arena.spec)  # the child's exit did not unlink it
        assert torch.equal(again.blocks[5], arena.blocks[5])
        again.close()
    finally:
        arena.close()
        arena.unlink()
    with pytest.raises(FileNotFoundError):
        ShmArena.attach(arena.spec)


def test_core_allocates_by_request_with_extend_semantics_and_accounts():
    core = KVStoreCore(_name(), 6, SHAPE, torch.float32)
    try:
        a = core.allocate("a", 2)
        assert len(a) == 2 and core.allocate("a", 1) == a  # never shrinks
        a3 = core.allocate("a", 3)
        assert a3[:2] == a and len(set(a3)) == 3
        assert core.allocate("b", 4) is None  # 3 free: refused, nothing taken
        assert core.blocks("b") == [] and core.stats().used_blocks == 3
        b = core.allocate("b", 3)
        assert not set(b) & set(a3)
        data = torch.randn(2, *SHAPE)
        core.write("b", [2, 0], data)
        assert torch.equal(core.read("b", [0, 2]), data.flip(0))
        with pytest.raises(IndexError):
            core.read("b", [3])
        with pytest.raises(KeyError):
            core.read("zz", [0])
        assert core.free("a") == 3 and core.free("a") == 0
        st = core.stats()
        assert (st.used_blocks, st.num_requests, st.failed_allocations, st.frees) == (3, 1, 1, 1)
        assert st.bytes_written == data.numel() * 4 == st.bytes_read
        assert st.usage == 0.5
    finally:
        core.close()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def store(ray_local):
    from alignedserve.kv_store.store import close_stores, get_or_create_store

    prefix = f"t{uuid.uuid4().hex[:6]}"
    handle = get_or_create_store(4, SHAPE, torch.float32, namespace_prefix=prefix)
    yield handle
    assert close_stores(prefix) == 1


def test_same_node_client_copies_through_shared_memory(ray_local, store):
    from alignedserve.kv_store.client import KVStoreClient

    ray = ray_local
    assert ray.get(store.allocate.remote("r1", 2)) is not None
    client = KVStoreClient(store)
    data = torch.randn(2, *SHAPE)
    client.write("r1", [0, 1], data)  # straight into the arena, no Ray transfer of data
    assert torch.equal(ray.get(store.read.remote("r1", [0, 1])), data)
    assert torch.equal(client.read("r1", [1]), data[1:])
    client.close()


def test_allocate_wait_waits_for_room_then_times_out(ray_local, store):
    from alignedserve.kv_store.store import allocate_wait

    ray = ray_local
    assert ray.get(store.allocate.remote("big", 4)) is not None  # the store is full
    timer = threading.Timer(0.3, lambda: ray.get(store.free.remote("big")))
    timer.start()
    t0 = time.monotonic()
    slots = allocate_wait(store, "next", 3, timeout_s=30)
    assert len(slots) == 3 and time.monotonic() - t0 >= 0.25  # it waited, then got room
    with pytest.raises(TimeoutError):
        allocate_wait(store, "more", 2, timeout_s=0.3)  # 1 block free: never enough
    timer.join()


def test_grpc_round_trip_on_loopback(ray_local, store):
    from alignedserve.kv_store.grpc_service import RemoteKVStoreClient

    ray = ray_local
    port = ray.get(store.start_grpc.remote("127.0.0.1", 0))
    remote = RemoteKVStoreClient(f"127.0.0.1:{port}")
    try:
        assert remote.block_shape == SHAPE and remote.dtype == torch.float32
        assert len(remote.allocate("g", 3)) == 3
        assert remote.allocate("h", 2) is None  # 1 left
        data = torch.randn(3, *SHAPE)
        assert remote.write("g", [0, 1, 2], data) == 3
        assert torch.equal(remote.read("g", [2, 0]), data[[2, 0]])
        assert torch.equal(ray.get(store.read.remote("g", [1])), data[1:2])  # same arena
        st = remote.stats()
        assert (st.used_blocks, st.num_requests) == (3, 1)
        assert remote.free("g") == 3 and remote.stats().used_blocks == 0
    finally:
        remote.close()


def test_a_pull_streams_another_stores_blocks_into_this_ones_and_fails_fast_when_it_is_gone():
    import grpc

    from alignedserve.kv_store.grpc_service import RemoteKVStoreClient, pull_into, start_server

    there = KVStoreCore(_name(), 8, SHAPE, torch.float32)
    here = KVStoreCore(_name(), 8, SHAPE, torch.float32)
    server = start_server(there, threading.Lock(), "127.0.0.1", 0)
    remote = RemoteKVStoreClient(f"127.0.0.1:{server.port}")
    try:
        data = torch.randn(3, *SHAPE)
        there.allocate("q", 3)
        there.write("q", [0, 1, 2], data)
        slots = here.allocate("q", 3)
        moved = pull_into(remote, "q", 3, here.arena.blocks, slots, timeout_s=10)
        assert moved == data.numel() * 4
        assert torch.equal(here.read("q", [0, 1, 2]), data)  # in this store's own slots
        assert there.stats().bytes_read == moved  # counted where it was served
        with pytest.raises(grpc.RpcError) as missing:
            pull_into(remote, "nobody", 1, here.arena.blocks, slots, timeout_s=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        server.server.stop(grace=0).wait()  # its node died
        with pytest.raises(grpc.RpcError) as gone:
            pull_into(remote, "q", 3, here.arena.blocks, slots, timeout_s=10)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE  # refused, not timed out
    finally:
        remote.close()
        there.close()
        here.close()


def test_arenas_of_dead_creators_are_removed_and_live_ones_kept():
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from alignedserve.kv_store.shm_arena import remove_orphans

    dead = _name()
    # The creator forgets the segment in its resource tracker: when the tracker dies with it
    # (a killed process group, a killed Ray worker), nothing else unlinks the segment.
    code = ("import torch, time; from multiprocessing import resource_tracker; "
            "from alignedserve.kv_store.shm_arena import ShmArena; "
            f"ShmArena.create({dead!r}, 4, (2, 3), torch.float32); "
            f"resource_tracker.unregister('/' + {dead!r}, 'shared_memory'); "
            "print('up', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert dead not in remove_orphans()  # its creator is alive
        proc.send_signal(signal.SIGKILL)  # dies without unlinking
        # Not reaped yet: a zombie, as a process whose parent was killed stays where PID 1
        # does not reap. It will never unlink its segment either.
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mine = ShmArena.create(_name(), 4, (2, 3), torch.float32)
        try:
            assert Path("/dev/shm", dead).exists()
            removed = remove_orphans()
            assert dead in removed and mine.spec.name not in removed
            assert not Path("/dev/shm", dead).exists()
            assert Path("/dev/shm", mine.spec.name).exists()
        finally:
            mine.close()
            mine.unlink()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_host_allocators_free_count_never_waits_for_the_store(ray_local):
    """The decode loop reads `num_free` every step: it answers from the store's last reply
    and asks again in the background, even while the store is slow to answer."""
    import types

    from alignedserve.kv_store.host_allocator import StoreHostAllocator

    @ray_local.remote(max_concurrency=2)
    class GatedStore:
        def __init__(self) -> None:
            self.gate = threading.Event()

        def open(self) -> None:
            self.gate.set()

        def stats(self) -> types.SimpleNamespace:
            self.gate.wait()
            return types.SimpleNamespace(num_blocks=10, used_blocks=7)

    store = GatedStore.remote()
    alloc = StoreHostAllocator(store, 10)
    seen: list[int] = []
    reader = threading.Thread(target=lambda: seen.extend(alloc.num_free for _ in range(3)))
    reader.start()
    reader.join(timeout=60)  # a read that waited for the store would still be blocked
    assert not reader.is_alive() and seen == [10, 10, 10]
    ray_local.get(store.open.remote())
    deadline = time.monotonic() + 30
    while alloc.num_free != 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alloc.num_free == 3


def _gated_store(ray, grant: bool = True):
    """A stand-in store whose allocate waits for `open()`; it logs calls in the order they
    run (the real store runs calls concurrently too: max_concurrency > 1)."""
    import types

    @ray.remote(max_concurrency=4)
    class GatedStore:
        def __init__(self) -> None:
            self.gate = threading.Event()
            self.log: list[str] = []

        def open(self) -> None:
            self.gate.set()

        def calls(self) -> list[str]:
            return self.log

        def allocate(self, owner: str, total: int) -> list[int] | None:
            self.gate.wait()
            self.log.append(f"allocate {owner}")
            return list(range(total)) if grant else None

        def free(self, owner: str) -> None:
            self.log.append(f"free {owner}")

        def stats(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(num_blocks=10, used_blocks=0)

    return GatedStore.remote()


def _wait_for(cond, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_admission_reserves_host_blocks_without_waiting_for_the_store(ray_local):
    """reserve_ahead answers at once and counts the blocks against the free hint (also
    against a stats answer that predates the allocation); the ids arrive when the store
    answers, picked up by the per-step num_free read."""
    from alignedserve.kv_store.host_allocator import StoreHostAllocator

    store = _gated_store(ray_local)
    alloc = StoreHostAllocator(store, 10)
    held: list[int] = []
    got: list[bool] = []
    caller = threading.Thread(target=lambda: got.append(alloc.reserve_ahead("a", held, 3)))
    caller.start()
    caller.join(timeout=60)  # a reservation that waited for the store would still be blocked
    assert not caller.is_alive() and got == [True] and held == []
    # The store's stats answer (0 used: the allocation has not run) still leaves 7 free.
    assert _wait_for(lambda: alloc.num_free == 7 and alloc._asked is None)
    ray_local.get(store.open.remote())
    assert _wait_for(lambda: alloc.num_free == 7 and held == [0, 1, 2])
    alloc.release("a", held)
    alloc.flush(submitted_seq=0, done_seq=0)  # no transfer outstanding: the free goes now
    assert _wait_for(lambda: ray_local.get(store.calls.remote()) == ["allocate a", "free a"])
    assert alloc.num_free == 10 and alloc.ahead_refused == 0


def test_a_release_waits_for_its_pending_reservation_so_the_free_cannot_overtake_it(ray_local):
    from alignedserve.kv_store.host_allocator import StoreHostAllocator

    store = _gated_store(ray_local)
    assert ray_local.get(store.calls.remote()) == []  # up, so its calls can overlap
    alloc = StoreHostAllocator(store, 10)
    held: list[int] = []
    assert alloc.reserve_ahead("b", held, 2)

    def finish() -> None:
        alloc.release("b", held)
        alloc.flush(submitted_seq=0, done_seq=0)

    releaser = threading.Thread(target=finish)
    releaser.start()
    releaser.join(timeout=0.5)
    ray_local.get(store.open.remote())
    releaser.join(timeout=60)
    assert not releaser.is_alive()
    assert _wait_for(lambda: len(ray_local.get(store.calls.remote())) == 2)
    assert ray_local.get(store.calls.remote()) == ["allocate b", "free b"]


def test_a_stopping_replica_settles_every_pending_reservation_first(ray_local):
    """A stopping replica frees its requests in the store directly: settle_all first
    waits for the reservations still on their way, so those frees cannot overtake them."""
    from alignedserve.kv_store.host_allocator import StoreHostAllocator

    store = _gated_store(ray_local)
    alloc = StoreHostAllocator(store, 10)
    held = {o: [] for o in ("d", "e")}
    for owner, blocks in held.items():
        assert alloc.reserve_ahead(owner, blocks, 2)
    timer = threading.Timer(0.3, lambda: ray_local.get(store.open.remote()))
    timer.start()
    alloc.settle_all()  # returns only once both allocations ran
    timer.join()
    assert held == {"d": [0, 1], "e": [0, 1]}
    assert sorted(ray_local.get(store.calls.remote())) == ["allocate d", "allocate e"]


def test_a_reservation_the_store_refuses_after_all_leaves_the_request_without_host_blocks(
        ray_local):
    from alignedserve.kv_store.host_allocator import StoreHostAllocator

    store = _gated_store(ray_local, grant=False)
    alloc = StoreHostAllocator(store, 10)
    held: list[int] = []
    assert alloc.reserve_ahead("c", held, 4)  # the hint had room
    ray_local.get(store.open.remote())
    # The per-step num_free read settles the answer; the hint gets its 4 blocks back.
    assert _wait_for(lambda: alloc.num_free == 10 and alloc.ahead_refused == 1)
    assert held == []
    assert not alloc.reserve("c", held, 4)  # a swap-out's reservation asks the store again
