"""The scheduler leader: its lock fails over, its dispatcher sends aligned groups to the
replicas with room (keeping KV on its node), it waits for work instead of polling, and it
cleans up after dead routers and replicas (real redis-server on loopback)."""

from __future__ import annotations

import time

import pytest

from alignedserve.deployments.router.leader import Dispatcher, LeaderLock, LeaderLoop
from alignedserve.global_queue.index import RedisQueueIndex
from alignedserve.global_queue.records import ReplicaState, RequestRecord, publish_state, put_record
from alignedserve.scheduling.dispatch import DispatchKnobs
from alignedserve.scheduling.sampling_params import SamplingParams


def _sole_leader(redis_url, keys, ttl_s: float, idle_s: float) -> LeaderLoop:
    """A started leader loop that has taken the lock (the only contender)."""
    lp = LeaderLoop(redis_url, keys, ttl_s=ttl_s, knobs=DispatchKnobs(1.5, 0, 10.0),
                    idle_s=idle_s).start()
    deadline = time.monotonic() + 5
    while not lp.is_leader and time.monotonic() < deadline:
        time.sleep(0.02)
    if not lp.is_leader:
        lp.stop()
        pytest.fail("the leader loop did not take an uncontended lock within 5 s")
    return lp


def test_leader_lock_fails_over_after_ttl(r, keys):
    a, b = LeaderLock(r, keys.leader, 0.3), LeaderLock(r, keys.leader, 0.3)
    assert a.hold() and a.hold()  # acquire, then renew
    assert not b.hold()
    time.sleep(0.45)  # a stops renewing (dies): the lock expires
    assert b.hold() and not a.hold()
    b.release()
    assert a.hold()


def test_dispatcher_assigns_aligned_groups_and_skips_aborted(r, keys):
    index = RedisQueueIndex(r, keys)
    for i, n in enumerate([10, 11, 12, 13, 500, 510, 2000]):
        index.put(f"q{i}", n)
        r.hset(keys.req(f"q{i}"), "node", "node-A")
    r.sadd(keys.aborted, "q1")
    freed: list[tuple[str, str]] = []
    publish_state(r, keys, ReplicaState("rep", time.time(), free=3, node="node-A"))
    d = Dispatcher(r, keys, DispatchKnobs(1.5, 0, 10.0),
                   free_kv=lambda rid, node: freed.append((rid, node)))
    # The narrowest aligned window of 3 is 11..13 (q1..q3); q1 was aborted: freed, not sent.
    assert d.tick() == 2
    assert [x.decode() for x in r.lrange(keys.inbox("rep"), 0, -1)] == ["q2", "q3"]
    assert freed == [("q1", "node-A")]
    assert [rid for _, rid in index.sorted_items()] == ["q0", "q4", "q5", "q6"]


def test_the_dispatcher_keeps_kv_on_its_node_and_honours_a_decode_cordon(r, keys):
    from alignedserve.global_queue.nodes import cordon, cordoned, uncordon

    index = RedisQueueIndex(r, keys)
    for rid, n, node in (("a1", 10, "A"), ("a2", 11, "A"), ("b1", 12, "B"), ("b2", 13, "B")):
        index.put(rid, n)
        r.hset(keys.req(rid), "node", node)
    publish_state(r, keys, ReplicaState("ra", time.time(), free=8, node="A"))
    publish_state(r, keys, ReplicaState("rb", time.time(), free=8, node="B"))
    d = Dispatcher(r, keys, DispatchKnobs(1.5, 0, 10.0))
    assert d.tick() == 4

    def inbox(rep: str) -> list[str]:
        return sorted(x.decode() for x in r.lrange(keys.inbox(rep), 0, -1))

    assert inbox("ra") == ["a1", "a2"] and inbox("rb") == ["b1", "b2"]
    # Cordoned for decode, A's replica gets nothing new: A's KV goes to B (a pull there).
    cordon(r, keys, "A", "decode")
    with pytest.raises(ValueError):
        cordon(r, keys, "A", "everything")
    assert cordoned(r, keys, "decode") == {"A"} and cordoned(r, keys, "prefill") == set()
    d.cordoned = cordoned(r, keys, "decode")
    index.put("a3", 14)
    r.hset(keys.req("a3"), "node", "A")
    assert d.tick() == 1 and "a3" in inbox("rb")
    assert uncordon(r, keys, "A") and cordoned(r, keys, "decode") == set()


def test_a_request_queued_again_is_located_again(r, keys):
    """The dispatcher reads where a queued request's KV is once; a request that comes back
    to the decode index (resumed after its holder died, prefilled on another node) must be
    read again, even when the index was empty in between."""
    index = RedisQueueIndex(r, keys)
    publish_state(r, keys, ReplicaState("ra", time.time(), free=8, node="A"))
    publish_state(r, keys, ReplicaState("rb", time.time(), free=8, node="B"))
    d = Dispatcher(r, keys, DispatchKnobs(1.5, 0, 10.0))
    index.put("x", 10)
    r.hset(keys.req("x"), "node", "A")
    assert d.tick() == 1 and r.lrange(keys.inbox("ra"), 0, -1) == [b"x"]
    assert d.tick() == 0  # nothing queued
    r.delete(keys.inbox("ra"))
    index.put("x", 12)  # back, with its KV now on B
    r.hset(keys.req("x"), "node", "B")
    assert d.tick() == 1
    assert r.lrange(keys.inbox("rb"), 0, -1) == [b"x"] and not r.llen(keys.inbox("ra"))


def test_leader_loop_only_one_dispatches(redis_url, r, keys):
    loops = [LeaderLoop(redis_url, keys, ttl_s=0.5, knobs=DispatchKnobs(1.5, 0, 10.0)).start()
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 5
        while sum(lp.is_leader for lp in loops) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(lp.is_leader for lp in loops) == 1
        leader = next(lp for lp in loops if lp.is_leader)
        leader.stop()  # releases the lock: the other takes over within a TTL
        other = next(lp for lp in loops if lp is not leader)
        deadline = time.monotonic() + 5
        while not other.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.is_leader
    finally:
        for lp in loops:
            lp.stop()


def test_an_idle_leader_waits_for_a_wake_up_instead_of_polling(redis_url, r, keys):
    """Nothing to dispatch: the leader ticks about once per idle_s (it polled every 5 ms,
    a steady tax on a 2-core host). An index insert, or a replica's new state, wakes it at
    once: dispatch does not wait out idle_s."""
    lp = _sole_leader(redis_url, keys, ttl_s=5.0, idle_s=1.0)
    try:
        t0, before = time.monotonic(), lp.ticks
        time.sleep(2.0)
        assert lp.ticks - before <= 4, lp.ticks - before  # 5 ms polling: ~400
        publish_state(r, keys, ReplicaState("rep", time.time(), free=4))
        RedisQueueIndex(r, keys).put("w1", 10)
        t0 = time.monotonic()
        while not r.llen(keys.inbox("rep")) and time.monotonic() - t0 < 5:
            time.sleep(0.005)
        assert r.lrange(keys.inbox("rep"), 0, -1) == [b"w1"]
        assert time.monotonic() - t0 < 0.5  # woken, well inside idle_s
        assert r.llen(keys.wake) <= 1  # one token at most, however many woke it
    finally:
        lp.stop()


def test_the_leader_aborts_the_requests_of_a_dead_router_and_frees_their_kv(r, keys):
    from alignedserve.deployments.router.leader import ROUTER_DEAD_S, sweep_dead_routers

    params = SamplingParams(max_tokens=5)
    pipe = r.pipeline()
    for rid in ("p", "d", "h"):
        put_record(pipe, keys, RequestRecord(rid, (1, 2), params, 1.0))
    pipe.rpush(keys.prefill, "p")  # waiting for prefill
    pipe.sadd(keys.routed("rt-dead"), "p", "d", "h")
    pipe.sadd(keys.routed("rt-live"), "x")
    pipe.hset(keys.routers, mapping={"rt-dead": time.time() - ROUTER_DEAD_S - 1,
                                     "rt-live": time.time()})
    pipe.execute()
    RedisQueueIndex(r, keys).put("d", 3)  # in the decode index: the leader frees its KV
    r.hset(keys.req("d"), "node", "node-A")  # ... in the store of the node that has it
    # "h" is held by a replica: the abort reaches it on the channel.
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(keys.abort_channel)
    freed: list[tuple[str, str]] = []
    assert sweep_dead_routers(r, keys, lambda rid, node: freed.append((rid, node)),
                              time.time()) == 3
    assert freed == [("d", "node-A")]
    assert r.llen(keys.prefill) == 0 and r.zcard(keys.decode) == 0
    assert not r.exists(keys.req("p")) and not r.exists(keys.req("d"))
    assert r.smismember(keys.aborted, ["p", "d", "h"]) == [1, 1, 1]
    got = set()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.5)
        if msg:
            got.add(msg["data"].decode())
    assert got == {"p", "d", "h"}
    assert r.hkeys(keys.routers) == [b"rt-live"] and r.exists(keys.routed("rt-live"))
    assert not r.exists(keys.routed("rt-dead"))


def test_the_leader_forgets_replicas_long_dead(r, keys):
    from alignedserve.deployments.router.leader import REPLICA_FORGET_S, forget_dead_replicas

    now = time.time()
    publish_state(r, keys, ReplicaState("r-old", now - REPLICA_FORGET_S - 1))
    publish_state(r, keys, ReplicaState("r-quiet", now - 60))  # stale, not yet forgotten
    r.rpush(keys.inbox("r-old"), "x")
    assert forget_dead_replicas(r, keys, now) == ["r-old"]
    assert r.hkeys(keys.replicas) == [b"r-quiet"] and not r.exists(keys.inbox("r-old"))


def test_an_idle_leader_renews_a_short_lock_in_time(redis_url, r, keys):
    """An idle leader waits for a wake-up, but never past its lock's renewal: with a TTL
    shorter than `idle_s` a rival must still find the lock held throughout."""
    lp = _sole_leader(redis_url, keys, ttl_s=0.3, idle_s=5.0)
    try:
        rival = LeaderLock(r, keys.leader, 0.3)
        for _ in range(30):  # 1.5 s: five TTLs
            assert not rival.hold()
            time.sleep(0.05)
        assert lp.is_leader
    finally:
        lp.stop()
