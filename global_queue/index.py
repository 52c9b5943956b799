"""The decode index in Redis: prefilled request ids in a sorted set scored by KV length."""

from __future__ import annotations

import redis

from alignedserve.global_queue.keys import RedisKeys

_TIE_BITS = 32  # score = kv_len << 32 | insertion seq (exact in a double below 2^53)


class RedisQueueIndex:
    """`KVLengthIndex` over a Redis sorted set; ties keep insertion order like the in-memory
    index. Several processes may share it; each call is one round trip."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.r = client
        self.keys = keys

    def put(self, request_id: str, kv_len: int) -> None:
        seq = self.r.incr(self.keys.seq) & ((1 << _TIE_BITS) - 1)
        self.r.zadd(self.keys.decode, {request_id: (kv_len << _TIE_BITS) | seq})

    def remove(self, request_id: str) -> bool:
        return bool(self.r.zrem(self.keys.decode, request_id))

    def sorted_items(self) -> list[tuple[int, str]]:
        """(kv_len, request id), shortest first, ties in insertion order."""
        items = self.r.zrange(self.keys.decode, 0, -1, withscores=True)
        return [(int(score) >> _TIE_BITS, rid.decode()) for rid, score in items]

    def __len__(self) -> int:
        return int(self.r.zcard(self.keys.decode))
