"""The Redis global queue: the decode index matches the in-memory one, records and token
events round-trip, requests move whole between stages, and new work is announced (real
redis-server on loopback). The leader's tests are in test_leader.py."""

from __future__ import annotations

import time

import pytest

from alignedserve.global_queue.events import TokenEvent, publish, replay
from alignedserve.global_queue.index import RedisQueueIndex
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.records import (
    ReplicaState,
    RequestRecord,
    assign,
    claim_prefill,
    claim_queue,
    load_records,
    publish_state,
    put_record,
    read_holder,
    resume,
    set_kv_location,
    set_prefilled,
)
from alignedserve.scheduling.length_index import InMemoryLengthIndex
from alignedserve.scheduling.sampling_params import SamplingParams


def test_replies_are_parsed_by_hiredis(r):
    """The router reads every token through redis-py: its replies go through hiredis's C
    parser (a pinned dependency), not redis-py's pure-Python fallback."""
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
    conn = r.connection_pool.get_connection()
    try:
        assert type(conn._parser).__name__ == "_HiredisParser"
    finally:
        r.connection_pool.release(conn)


def test_redis_index_orders_like_the_in_memory_index(r, keys):
    red, mem = RedisQueueIndex(r, keys), InMemoryLengthIndex()
    ops = [("a", 50), ("b", 7), ("c", 50), ("d", 3000), ("b", 60), ("e", 7), ("f", 50)]
    for rid, n in ops:
        red.put(rid, n)
        mem.put(rid, n)
    assert red.sorted_items() == mem.sorted_items()  # ties keep insertion order
    assert red.remove("c") and mem.remove("c")
    assert not red.remove("zz")
    assert red.sorted_items() == mem.sorted_items()
    assert len(red) == len(mem) == 5
    for n in (0, 6, 7, 50, 59, 60, 2999, 3000):
        assert red.shortest_above(n) == mem.shortest_above(n), n
    assert mem.shortest_above(7) == (50, "a") and mem.shortest_above(3000) is None


def test_record_and_stream_event_round_trip(r, keys):
    params = SamplingParams(max_tokens=9, temperature=0.0, stop=("x", "yy"), seed=3,
                            stop_token_ids=(4,), ignore_eos=True, logprobs=True)
    rec = RequestRecord("q1", (1, 2, 3), params, 1234.5, (7,), (40, 41), "r-1")
    pipe = r.pipeline()
    put_record(pipe, keys, rec)
    pipe.execute()
    back = RequestRecord.from_redis("q1", r.hgetall(keys.req("q1")))
    assert back == rec and back.kv_len == 4
    # The stages' partial writes land in the same typed fields.
    pipe = r.pipeline()
    put_record(pipe, keys, RequestRecord("q2", (1, 2), params, 5.0))
    pipe.rpush(keys.prefill, "q2")
    pipe.execute()
    assert claim_prefill(r, keys, "w-9", 5) == ["q2"]
    (q2,) = load_records(r, keys, ["q2", "gone"])
    assert q2 == RequestRecord("q2", (1, 2), params, 5.0, (), (), "w-9")
    pipe = r.pipeline()
    set_prefilled(pipe, keys, "q2", (8,), (3, 4), "node-A")  # the worker lets go of it
    pipe.execute()
    (q2,) = load_records(r, keys, ["q2"])
    assert q2 == RequestRecord("q2", (1, 2), params, 5.0, (8,), (3, 4), None, "node-A")
    set_kv_location(r, keys, "q2", [7, 8], "node-B")  # a replica on B pulled its KV
    (q2,) = load_records(r, keys, ["q2"])
    assert (q2.slots, q2.node) == ((7, 8), "node-B")
    state = ReplicaState("r-1", 99.0, requests=3, free=5, prefetch_hit_rate=0.5,
                         node="node-B", actors=("a", "b"), namespace="serve")
    publish_state(r, keys, state)
    assert ReplicaState.from_json(r.hget(keys.replicas, "r-1")) == state
    pipe = r.pipeline()
    publish(pipe, keys, "q1", TokenEvent((5, 6), 2, None, (-0.5, -1.25)))
    publish(pipe, keys, "q1", TokenEvent((9,), 3, "length"))
    pipe.execute()
    events = [TokenEvent.from_fields(f) for _, f in r.xrange(keys.tok("q1"))]
    assert events == [TokenEvent((5, 6), 2, None, (-0.5, -1.25)),
                      TokenEvent((9,), 3, "length")]
    assert not r.exists(keys.req("q1"))  # a finished request's record is dropped
    assert 0 < r.ttl(keys.tok("q1")) <= 600


def test_a_request_moves_whole_between_stages_and_resumes_after_its_holder_died(r, keys,
                                                                              redis_url):
    import asyncio

    from alignedserve.global_queue.connection import connect_async

    params = SamplingParams(max_tokens=5, temperature=0.0)
    pipe = r.pipeline()
    for rid in ("a", "b", "c"):
        put_record(pipe, keys, RequestRecord(rid, (1, 2, 3), params, 1.0))
    pipe.rpush(keys.prefill, "a", "b", "a", "c")  # "a" twice: a retried push
    pipe.sadd(keys.aborted, "c")
    pipe.execute()
    # Claiming makes the worker the holder once; an aborted request's record is dropped.
    assert claim_prefill(r, keys, "w-1", 10) == ["a", "b"]
    assert not r.exists(keys.req("c")) and r.llen(keys.prefill) == 0
    # Prefilled: "a" to the index; assigning it moves it to a replica's inbox atomically.
    index = RedisQueueIndex(r, keys)
    pipe = r.pipeline()
    set_prefilled(pipe, keys, "a", (9,), (0,), "node-A")
    set_prefilled(pipe, keys, "b", (9,), (1,), "node-A")
    pipe.execute()
    index.put("a", 4)
    index.put("b", 4)
    r.sadd(keys.aborted, "b")
    # "b" was aborted while queued: the leader frees its KV, on the node that has it.
    assert assign(r, keys, "r-1", ["a", "b", "gone"]) == (1, [("b", "node-A")])
    assert r.lrange(keys.inbox("r-1"), 0, -1) == [b"a"] and len(index) == 0
    # The replica streams two more tokens (one twice, as a retried write would), then dies.
    pipe = r.pipeline()
    publish(pipe, keys, "a", TokenEvent((9,), 1))
    publish(pipe, keys, "a", TokenEvent((7,), 2))
    publish(pipe, keys, "a", TokenEvent((7,), 2))
    publish(pipe, keys, "a", TokenEvent((6,), 3))
    pipe.execute()
    out, final = replay(r.xrange(keys.tok("a")))
    assert (out, final) == ([9, 7, 6], False)

    async def resume_twice() -> tuple[bool, bool]:
        client = connect_async(redis_url)
        try:
            first = await resume(client, keys, "a", "r-1", tuple(out))
            return first, await resume(client, keys, "a", "r-1", tuple(out))
        finally:
            await client.aclose()

    assert asyncio.run(resume_twice()) == (True, False)  # the holder changed after the first
    (a,) = load_records(r, keys, ["a"])
    assert a.output_token_ids == (9, 7, 6) and a.slots == () and a.holder is None
    assert a.node == ""  # its KV is gone with its holder: recomputed wherever it lands
    assert r.lrange(keys.prefill, 0, -1) == [b"a"]  # at the head, for a worker to recompute
    assert claim_prefill(r, keys, "w-2", 1) == ["a"]
    pipe = r.pipeline()
    read_holder(pipe, keys, "a")
    assert pipe.execute() == [b"w-2"]


def test_the_router_passes_each_token_on_once(redis_url, keys):
    import asyncio

    from alignedserve.deployments.router.redis_backend import RedisBackend

    async def run() -> list[TokenEvent]:
        backend = RedisBackend(redis_url, keys)
        backend._queues["x"] = q = asyncio.Queue()
        backend._last_ids["x"], backend._delivered["x"] = b"0-0", 0
        entries = [(b"1-0", TokenEvent((1,), 1).to_fields()),
                   (b"2-0", TokenEvent((2, 3), 3, None, (-1.0, -2.0)).to_fields()),
                   (b"3-0", TokenEvent((2, 3), 3).to_fields()),  # a duplicate
                   (b"4-0", TokenEvent((3, 4), 4, "length").to_fields())]  # overlaps by one
        backend._deliver("x", [(i, {k.encode(): v.encode() for k, v in f.items()})
                               for i, f in entries])
        await backend.close()
        return [q.get_nowait() for _ in range(q.qsize())]

    assert asyncio.run(run()) == [TokenEvent((1,), 1), TokenEvent((2, 3), 3, None, (-1.0, -2.0)),
                                  TokenEvent((4,), 4, "length")]


def test_a_starting_deployment_clears_what_a_dead_one_left_and_refuses_a_live_one(r, keys):
    other = RedisKeys(keys.prefix + "other:")
    r.set(other.leader, "x")  # another deployment's keys on the same Redis stay
    # An unclean stop: a replica registration 60 s old, a record, a stream, queued ids.
    publish_state(r, keys, ReplicaState("r-dead", time.time() - 60, free=5))
    pipe = r.pipeline()
    put_record(pipe, keys, RequestRecord("old", (1, 2), SamplingParams(max_tokens=3), 1.0))
    publish(pipe, keys, "old", TokenEvent((4,), 1))
    pipe.rpush(keys.prefill, "old")
    pipe.execute()
    RedisQueueIndex(r, keys).put("old2", 9)
    assert claim_queue(r, keys, stale_after_s=30.0) >= 6
    left = {k.decode() for k in r.scan_iter(match=f"{keys.prefix}*")}
    assert left == {other.leader}  # a longer prefix that starts with ours is not ours
    # A replica that published 1 s ago is alive: the queue is not taken from it.
    publish_state(r, keys, ReplicaState("r-live", time.time() - 1.0, free=5))
    with pytest.raises(ValueError, match="r-live"):
        claim_queue(r, keys, stale_after_s=30.0)
    assert r.hexists(keys.replicas, "r-live")


def test_a_request_resumed_from_a_live_holder_is_kept_not_failed(r, keys, tiny_dir):
    """A router that took a slow (not dead) holder for dead resumes its request, and the
    same process claims it back. It keeps serving it: no duplicate in its engine and no
    error event to a client whose request is being served."""
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import LLMEngine
    from alignedserve.prefetch_workers.worker import admit_claimed

    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_gib=0.02))
    params = SamplingParams(max_tokens=5, temperature=0.0)
    pipe = r.pipeline()
    put_record(pipe, keys, RequestRecord("a", (1, 2, 3), params, 1.0))
    pipe.rpush(keys.prefill, "a")
    pipe.execute()
    assert [x.request_id for x in admit_claimed(engine, r, keys,
                                                claim_prefill(r, keys, "w-1", 4))] == ["a"]
    assert resume(r, keys, "a", "w-1", ())  # taken for dead while it still serves "a"
    kept: set[str] = set()
    assert admit_claimed(engine, r, keys, claim_prefill(r, keys, "w-1", 4), kept) == []
    assert kept == {"a"}  # the replica ignores the "a@w-1" abort that went with the resume
    assert engine.num_requests == 1 and engine.get_request("a") is not None
    assert not r.exists(keys.tok("a"))  # no error event was published
    pipe = r.pipeline()
    read_holder(pipe, keys, "a")
    assert pipe.execute() == [b"w-1"]  # its holder again



def test_new_work_is_announced_and_a_heartbeat_wakes_the_dispatch_only_when_room_moved(
        r, keys):
    """Idle compute replicas and prefetch workers wait on the work channel instead of
    polling Redis: a prompt queued (new or resumed) and ids put in an inbox announce
    themselves there, an assignment that moved nothing does not. A replica's heartbeat
    refreshes its state's timestamp but wakes the leader's dispatch only when the
    replica's room changed."""
    from alignedserve.deployments.replica.liveness import ReplicaLiveness
    from alignedserve.global_queue.records import enqueue

    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.work_channel)

    def announced() -> list[bytes]:
        """What the channel carried within half a second."""
        got, end = [], time.monotonic() + 0.5
        while (left := end - time.monotonic()) > 0:
            if (msg := sub.get_message(timeout=left)) is not None:
                got.append(msg["data"])
        return got

    pipe = r.pipeline()
    enqueue(pipe, keys, RequestRecord("w1", (1, 2), SamplingParams(), 1.0))
    pipe.execute()
    assert announced() == [b"prefill"]
    assert claim_prefill(r, keys, "wk", 1) == ["w1"]
    RedisQueueIndex(r, keys).put("w1", 3)
    assert assign(r, keys, "rep", ["w1"]) == (1, [])
    assert announced() == [b"rep"]
    assert assign(r, keys, "rep", ["w1"]) == (0, [])  # already taken: nothing to announce
    assert resume(r, keys, "w1", "rep", (7,))
    assert announced() == [b"prefill"]
    assert r.lrange(keys.prefill, 0, -1) == [b"w1"]

    class Heart(ReplicaLiveness):
        def __init__(self) -> None:
            self.r, self.keys = r, keys
            self._last_state = ReplicaState("rep", 0.0, free=4)

    heart = Heart()
    r.delete(keys.wake)
    heart._publish_now()
    assert r.llen(keys.wake) == 1  # the first state: the dispatch has a replica to fill
    r.delete(keys.wake)
    t0 = ReplicaState.from_json(r.hget(keys.replicas, "rep")).ts
    time.sleep(0.01)
    heart._publish_now()
    assert ReplicaState.from_json(r.hget(keys.replicas, "rep")).ts > t0  # still alive
    assert r.llen(keys.wake) == 0  # nothing new for the dispatch
    heart._last_state = ReplicaState("rep", 0.0, free=3)
    heart._publish_now()
    assert r.llen(keys.wake) == 1



def test_a_heartbeat_nudged_by_the_decode_loop_publishes_at_once(r, keys, monkeypatch):
    """The heartbeat beats every HEARTBEAT_S, but the decode loop nudges it when the
    replica's room moved: the leader's dispatch must not wait a beat for that. With the
    period set to an hour, only the nudges can publish here."""
    import dataclasses
    import threading
    import types

    import ray

    from alignedserve.deployments.replica import liveness

    monkeypatch.setattr(liveness, "HEARTBEAT_S", 3600.0)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0)
        class Peer:  # the prefetch worker's ping and the store's stats
            def ping(self) -> bool:
                return True

            def stats(self) -> types.SimpleNamespace:
                return types.SimpleNamespace(num_blocks=1, used_blocks=0, num_requests=0,
                                             bytes_read=0)

        peer = Peer.remote()

        class Heart(liveness.ReplicaLiveness):
            def __init__(self) -> None:
                self.r, self.keys, self.replica_id = r, keys, "rep"
                self.node, self.store_address = "n", "127.0.0.1:1"
                self.worker = self.store = peer
                self._stop, self._beat, self._error = threading.Event(), threading.Event(), None
                self._last_state = ReplicaState("rep", 0.0, free=4)

        def published_free() -> int | None:
            raw = r.hget(keys.replicas, "rep")
            return None if raw is None else ReplicaState.from_json(raw).free

        heart = Heart()
        r.hdel(keys.replicas, "rep")
        beat = threading.Thread(target=heart._heartbeat, daemon=True)
        beat.start()
        for free in (4, 3):
            heart._last_state = dataclasses.replace(heart._last_state, free=free)
            heart._beat.set()
            deadline = time.monotonic() + 30
            while published_free() != free and time.monotonic() < deadline:
                time.sleep(0.02)
            assert published_free() == free
        heart._stop.set()
        heart._beat.set()
        beat.join(timeout=30)
        assert not beat.is_alive() and heart._error is None
    finally:
        if started:
            ray.shutdown()
