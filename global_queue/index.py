"""The decode index in Redis: prefilled request ids in a sorted set scored by KV length."""

from __future__ import annotations

import time

import redis

from alignedserve.global_queue.keys import RedisKeys
from alignedserve.scheduling.dispatch import Queued

_TIE_BITS = 32  # score = kv_len << 32 | insertion seq (exact in a double below 2^53)


class RedisQueueIndex:
    """`KVLengthIndex` over a Redis sorted set; ties keep insertion order like the in-memory
    index. Several processes may share it; each call is one round trip."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.r = client
        self.keys = keys

    def put(self, request_id: str, kv_len: int, arrival_time: float | None = None) -> None:
        """Insert or move; `arrival_time` (time.time() seconds at the router; default now)
        feeds the global starvation clock."""
        pipe = self.r.pipeline(transaction=True)  # both sets or neither
        self.put_on(pipe, request_id, kv_len, arrival_time, self.next_seqs(1))
        pipe.execute()

    def next_seqs(self, n: int) -> int:
        """Reserve `n` insertion numbers for `put_on`; returns the first."""
        return int(self.r.incrby(self.keys.seq, n)) - n + 1

    def put_on(self, pipe: redis.client.Pipeline, request_id: str, kv_len: int,
               arrival_time: float | None, seq: int) -> None:
        """Queue the insert on `pipe` (a transaction, to go with the hand-off that makes
        it), with an insertion number from `next_seqs`."""
        arrival_time = time.time() if arrival_time is None else arrival_time
        tie = seq & ((1 << _TIE_BITS) - 1)
        pipe.zadd(self.keys.decode, {request_id: (kv_len << _TIE_BITS) | tie})
        pipe.zadd(self.keys.decode_arrival, {request_id: arrival_time})
        wake_dispatch(pipe, self.keys)

    def remove(self, request_id: str) -> bool:
        """Whoever removes a request from the index holds it (ZREM returns 1 once)."""
        pipe = self.r.pipeline(transaction=True)
        unindex(pipe, self.keys, request_id)
        return bool(pipe.execute()[0])

    def sorted_items(self) -> list[tuple[int, str]]:
        """(kv_len, request id), shortest first, ties in insertion order."""
        items = self.r.zrange(self.keys.decode, 0, -1, withscores=True)
        return [(int(score) >> _TIE_BITS, rid.decode()) for rid, score in items]

    def shortest_above(self, kv_len: int) -> tuple[int, str] | None:
        """The first of `sorted_items` longer than `kv_len`, if any."""
        items = self.r.zrangebyscore(self.keys.decode, (kv_len + 1) << _TIE_BITS, "+inf",
                                     start=0, num=1, withscores=True)
        return (int(items[0][1]) >> _TIE_BITS, items[0][0].decode()) if items else None

    def queued(self) -> list[Queued]:
        """The index as the dispatch policy reads it: by KV length, with arrival times."""
        pipe = self.r.pipeline(transaction=True)
        pipe.zrange(self.keys.decode, 0, -1, withscores=True)
        pipe.zrange(self.keys.decode_arrival, 0, -1, withscores=True)
        by_len, arrivals = pipe.execute()
        arrived = {rid: t for rid, t in arrivals}
        return [Queued(rid.decode(), int(score) >> _TIE_BITS, arrived.get(rid, 0.0))
                for rid, score in by_len]

    def __len__(self) -> int:
        return int(self.r.zcard(self.keys.decode))


def unindex(pipe: redis.client.Pipeline, keys: RedisKeys, rid: str) -> None:
    """Queue the removal of `rid` from the index on `pipe`: two results, the first is 1 when
    `rid` was in the index (the caller then holds it)."""
    pipe.zrem(keys.decode, rid)
    pipe.zrem(keys.decode_arrival, rid)


def wake_dispatch(pipe: redis.client.Pipeline, keys: RedisKeys) -> None:
    """Queue a wake-up of the leader's dispatch on `pipe` (the wake list keeps one token, so
    it stays one entry however many wake it while no leader reads it)."""
    pipe.lpush(keys.wake, 1)
    pipe.ltrim(keys.wake, 0, 0)
