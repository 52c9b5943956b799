"""The global queue in Redis: request records, the prefill queue, the decode index (a sorted
set by KV length), per-replica inboxes and per-request token streams.

Key layout (prefix `p`, default "alignedserve:"):
    p req:{id}        hash   the request record (RequestRecord fields, JSON-encoded)
    p prefill         list   request ids waiting for prefill, FCFS (router RPUSH, worker LPOP)
    p decode          zset   prefilled request ids scored by KV length (the leader's index)
    p seq             string counter giving index ties their insertion order
    p inbox:{replica} list   request ids the leader assigned to a compute replica
    p tok:{id}        stream token events of one request (replica/worker XADD, router XREAD)
    p aborted         set    ids a client abandoned; every stage checks it at hand-off
    p abort           pubsub ids to abort now (compute replicas listen)
    p replicas        hash   replica id -> JSON state (ReplicaState), refreshed every loop
    p workers         hash   prefetch worker id -> JSON stats
    p leader          string the scheduler leader's lock (token, with a TTL)

Ownership: a request is held by exactly one stage at a time (prefill queue, a prefetch
worker, the decode index, the leader in transit, a compute replica). The holder frees its KV
when it sees the request aborted; removal from a Redis structure (LPOP, ZREM) is what moves
ownership, so two stages never both hold it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import redis

from alignedserve.scheduling.sampling_params import SamplingParams

_TIE_BITS = 32  # decode-index score = kv_len << 32 | insertion seq (exact in a double < 2^53)
STREAM_TTL_S = 600  # token streams outlive their request this long (late readers, resume)


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = "alignedserve:"

    def req(self, rid: str) -> str:
        return f"{self.prefix}req:{rid}"

    def tok(self, rid: str) -> str:
        return f"{self.prefix}tok:{rid}"

    def inbox(self, replica: str) -> str:
        return f"{self.prefix}inbox:{replica}"

    @property
    def prefill(self) -> str:
        return f"{self.prefix}prefill"

    @property
    def decode(self) -> str:
        return f"{self.prefix}decode"

    @property
    def aborted(self) -> str:
        return f"{self.prefix}aborted"

    @property
    def abort_channel(self) -> str:
        return f"{self.prefix}abort"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}replicas"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    @property
    def leader(self) -> str:
        return f"{self.prefix}leader"


@dataclass(frozen=True)
class RequestRecord:
    """A request as every stage sees it. Written by the router, extended by the prefetch
    worker after prefill (output ids so far)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float  # time.time() seconds at the router
    output_token_ids: tuple[int, ...] = ()  # generated so far (the first comes from prefill)
    slots: tuple[int, ...] = ()  # KV-store slots of the prompt's KV (set by the prefetch worker)

    @property
    def kv_len(self) -> int:
        """Tokens whose KV the request depends on next step: prompt + generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def to_redis(self) -> dict[str, str]:
        params = dataclasses.asdict(self.params)
        params.pop("extra", None)
        return {"prompt": json.dumps(self.prompt_token_ids), "params": json.dumps(params),
                "arrival": repr(self.arrival_time), "out": json.dumps(self.output_token_ids)}

    @classmethod
    def from_redis(cls, rid: str, h: dict[bytes, bytes]) -> RequestRecord:
        p = json.loads(h[b"params"])
        p["stop"], p["stop_token_ids"] = tuple(p["stop"]), tuple(p["stop_token_ids"])
        return cls(rid, tuple(json.loads(h[b"prompt"])), SamplingParams(**p),
                   float(h[b"arrival"]), tuple(json.loads(h.get(b"out", b"[]"))),
                   tuple(int(x) for x in h.get(b"slots", b"").split()))


class RedisQueueIndex:
    """`KVLengthIndex` over a Redis sorted set; ties keep insertion order like the in-memory
    index. Several processes may share it; each call is one round trip."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.r = client
        self.keys = keys

    def put(self, request_id: str, kv_len: int) -> None:
        seq = self.r.incr(f"{self.keys.prefix}seq") & ((1 << _TIE_BITS) - 1)
        self.r.zadd(self.keys.decode, {request_id: (kv_len << _TIE_BITS) | seq})

    def remove(self, request_id: str) -> bool:
        return bool(self.r.zrem(self.keys.decode, request_id))

    def sorted_items(self) -> list[tuple[int, str]]:
        items = self.r.zrange(self.keys.decode, 0, -1, withscores=True)
        return [(int(score) >> _TIE_BITS, rid.decode()) for rid, score in items]

    def __len__(self) -> int:
        return int(self.r.zcard(self.keys.decode))


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a request's token stream."""

    token_ids: tuple[int, ...]  # new output ids
    num_output_tokens: int  # cumulative
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None
    error: str | None = None

    def to_fields(self) -> dict[str, str]:
        f = {"ids": " ".join(map(str, self.token_ids)), "n": str(self.num_output_tokens)}
        if self.finish_reason:
            f["f"] = self.finish_reason
        if self.logprobs is not None:
            f["lp"] = json.dumps(self.logprobs)
        if self.error:
            f["err"] = self.error
        return f

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> StreamEvent:
        ids = f.get(b"ids", b"").split()
        lp = f.get(b"lp")
        return cls(tuple(int(i) for i in ids), int(f[b"n"]),
                   f[b"f"].decode() if b"f" in f else None,
                   tuple(json.loads(lp)) if lp else None,
                   f[b"err"].decode() if b"err" in f else None)


def publish(pipe: redis.client.Pipeline, keys: RedisKeys, rid: str, ev: StreamEvent) -> None:
    """Queue one token event on `pipe` (the caller executes it, once per step)."""
    pipe.xadd(keys.tok(rid), ev.to_fields())
    if ev.finish_reason or ev.error:
        pipe.expire(keys.tok(rid), STREAM_TTL_S)
        pipe.delete(keys.req(rid))


def load_records(client: redis.Redis, keys: RedisKeys, rids: list[str]) -> list[RequestRecord]:
    """Records of `rids` that still exist (an aborted request's record may be gone)."""
    pipe = client.pipeline(transaction=False)
    for rid in rids:
        pipe.hgetall(keys.req(rid))
    return [RequestRecord.from_redis(rid, h) for rid, h in zip(rids, pipe.execute(), strict=True)
            if h]


def is_aborted(client: redis.Redis, keys: RedisKeys, rids: list[str]) -> list[bool]:
    if not rids:
        return []
    return [bool(x) for x in client.smismember(keys.aborted, rids)]
