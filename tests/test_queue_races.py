"""Races between the stages over the Redis queue (real redis-server on loopback): many
arrivals against the admission bound, and a holder taken for dead that is still at work.
A request must never run twice, and its KV must never be freed while someone uses it."""

from __future__ import annotations

import asyncio
import time

import redis

from alignedserve.deployments.router.openai_protocol import APIError
from alignedserve.deployments.router.redis_backend import RedisBackend
from alignedserve.global_queue.records import (
    ADMIT_HOLD_S,
    RequestRecord,
    claim_prefill,
    enqueue,
    hand_off,
    put_record,
    resume,
    set_prefilled,
)
from alignedserve.scheduling.sampling_params import SamplingParams


def _claimed(r, keys, rids: tuple[str, ...], holder: str) -> None:
    pipe = r.pipeline()
    for rid in rids:
        put_record(pipe, keys, RequestRecord(rid, (1, 2, 3), SamplingParams(max_tokens=5), 1.0))
    pipe.rpush(keys.prefill, *rids)
    pipe.execute()
    assert claim_prefill(r, keys, holder, len(rids)) == list(rids)


def test_admission_holds_its_bound_under_concurrent_arrivals(redis_url, keys):
    """40 requests arrive at once on two routers, 16 may wait: exactly 16 are admitted
    (a read-then-push check lets a burst through). Queuing one frees its place; a place
    never queued lapses."""
    async def burst(tag: str) -> list[int]:
        routers = [RedisBackend(redis_url, keys, max_queued=16) for _ in range(2)]

        async def one(i: int) -> int:
            try:
                await routers[i % 2].admit(f"{tag}{i}")
                return 200
            except APIError as e:
                assert e.headers() == {"Retry-After": "2"}
                return e.status

        codes = await asyncio.gather(*(one(i) for i in range(40)))
        for b in routers:
            await b.close()
        return codes

    codes = asyncio.run(burst("q"))
    assert codes.count(200) == 16 and codes.count(429) == 24
    r = redis.Redis.from_url(redis_url)
    admitted = [f"q{i}" for i, c in enumerate(codes) if c == 200]
    pipe = r.pipeline()
    enqueue(pipe, keys, RequestRecord(admitted[0], (1, 2), SamplingParams(), 1.0))
    pipe.execute()
    assert r.zcard(keys.admitting) == 15
    assert r.lrange(keys.prefill, 0, -1) == [admitted[0].encode()]
    assert asyncio.run(burst("s")).count(200) == 0  # still 16 waiting: 15 places, 1 queued
    # Places older than the hold lapse (as if their routers died before queuing them).
    r.zadd(keys.admitting, {rid: time.time() - ADMIT_HOLD_S - 5 for rid in admitted[1:]})
    assert asyncio.run(burst("t")).count(200) == 15


def test_a_stage_that_lost_a_request_does_not_hand_it_on(r, keys, redis_url):
    """A worker still prefilling requests a router resumed (it took the pair for dead):
    its hand-off skips them, also when the resume lands between its check and its commit,
    so a request never runs twice (two copies would write the same store blocks)."""
    _claimed(r, keys, ("a", "b", "c"), "w-1")
    assert resume(r, keys, "b", "w-1", ())  # the router's resume, and a new holder
    assert claim_prefill(r, keys, "w-2", 10) == ["b"]
    calls: list[list[str]] = []
    other = redis.Redis.from_url(redis_url)

    def write(pipe, held: list[str]) -> None:
        calls.append(held)
        if len(calls) == 1:  # a router resumes "c" while the worker writes its KV
            assert resume(other, keys, "c", "w-1", ())
        for rid in held:
            set_prefilled(pipe, keys, rid, (9,), (0,), "node-A")

    assert hand_off(r, keys, "w-1", ["a", "b", "c"], write) == ["a"]
    assert calls == [["a", "c"], ["a"]]  # the first commit failed: checked again
    assert r.hget(keys.req("a"), "holder") is None  # handed on
    assert r.hget(keys.req("b"), "holder") == b"w-2"
    assert r.hget(keys.req("c"), "out") == b"[]"  # not overwritten by the lost hand-off
    assert r.lrange(keys.prefill, 0, -1) == [b"c"]


def test_a_resume_frees_kv_only_of_a_request_it_took_over(r, keys, redis_url):
    """The router resumes what a holder it takes for dead still holds: it takes the request
    over first, so the holder (only slow) can no longer hand it on, then frees its KV and
    queues it. A request the holder handed on meanwhile keeps its KV (freeing it would
    hand blocks in use to the next prefill)."""
    _claimed(r, keys, ("a", "b"), "w-1")
    pipe = r.pipeline()
    set_prefilled(pipe, keys, "a", (9,), (3,), "node-A")  # handed on just before the resume
    pipe.execute()
    freed: list[tuple[str, str]] = []

    async def router_resumes() -> None:
        backend = RedisBackend(redis_url, keys, free_kv=lambda rid, node: freed.append(
            (rid, node)))
        for rid in ("a", "b"):
            await backend._resume(rid, "w-1", "node-A")
        await backend.close()

    asyncio.run(router_resumes())
    assert freed == [("b", "node-A")]
    assert r.lrange(keys.prefill, 0, -1) == [b"b"]
    assert r.hget(keys.req("a"), "slots") == b"3"
    assert hand_off(r, keys, "w-1", ["b"], lambda pipe, held: None) == []
