"""Typed records kept in Redis: one per request, one per compute replica.

A request record's fields and who writes each (`RequestRecord`):
    prompt, params, arrival   the router, once (`put_record`)
    holder                    the stage that takes the request: a prefetch worker
                              (`claim_prefill`), a compute replica (`assign`); cleared when
                              the decode index or the prefill queue holds it again
    out, slots, node          the prefetch worker after prefill (`set_prefilled`); a
                              compute replica that pulled the KV from another node's store
                              (`set_kv_location`); cleared when a request resumes (`resume`)
The compute replica publishes tokens to the stream only; the record keeps the state a new
holder needs to continue the request (prompt, output so far, where its KV is). Moves between
stages are single Redis scripts, so a process dying mid-move never drops a request.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from alignedserve.global_queue.events import STREAM_TTL_S
from alignedserve.global_queue.index import wake_dispatch
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.scheduling.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestRecord:
    """A request as every stage sees it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]  # validated by the router
    params: SamplingParams  # max_tokens already resolved by the router
    arrival_time: float  # time.time() seconds at the router; the starvation clocks use it
    output_token_ids: tuple[int, ...] = ()  # generated so far (the first comes from prefill)
    slots: tuple[int, ...] = ()  # KV-store blocks holding the prompt's KV, position order
    holder: str | None = None  # replica or worker id that holds the request now
    node: str = ""  # Ray node id of the KV store that holds `slots` ("" before prefill)

    @property
    def kv_len(self) -> int:
        """Tokens whose KV the request depends on next step: prompt + generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def to_redis(self) -> dict[str, str]:
        params = dataclasses.asdict(self.params)
        params.pop("extra", None)
        fields = {"prompt": json.dumps(self.prompt_token_ids), "params": json.dumps(params),
                  "arrival": repr(self.arrival_time), **_prefilled(self.output_token_ids,
                                                                   self.slots, self.node)}
        if self.holder is not None:
            fields["holder"] = self.holder
        return fields

    @classmethod
    def from_redis(cls, rid: str, h: dict[bytes, bytes]) -> RequestRecord:
        p = json.loads(h[b"params"])
        p["stop"], p["stop_token_ids"] = tuple(p["stop"]), tuple(p["stop_token_ids"])
        holder = h.get(b"holder")
        return cls(rid, tuple(json.loads(h[b"prompt"])), SamplingParams(**p),
                   float(h[b"arrival"]), tuple(json.loads(h.get(b"out", b"[]"))),
                   tuple(int(x) for x in h.get(b"slots", b"").split()),
                   holder.decode() if holder is not None else None,
                   h.get(b"node", b"").decode())


def _prefilled(output_ids: tuple[int, ...], slots: tuple[int, ...],
               node: str) -> dict[str, str]:
    return {"out": json.dumps(list(output_ids)), "slots": " ".join(map(str, slots)),
            "node": node}


def put_record(pipe: redis.client.Pipeline, keys: RedisKeys, rec: RequestRecord) -> None:
    pipe.hset(keys.req(rec.request_id), mapping=rec.to_redis())


def read_holder(pipe: redis.client.Pipeline, keys: RedisKeys, rid: str) -> None:
    """Queue a read of `rid`'s holder on `pipe` (its result: the id as bytes, or None)."""
    pipe.hget(keys.req(rid), "holder")


def set_prefilled(pipe: redis.client.Pipeline, keys: RedisKeys, rid: str,
                  output_ids: tuple[int, ...], slots: tuple[int, ...], node: str) -> None:
    """Output so far and the store blocks (on `node`) with its KV; the worker lets go of it
    (the decode index holds it next, in the same transaction)."""
    pipe.hset(keys.req(rid), mapping=_prefilled(output_ids, slots, node))
    pipe.hdel(keys.req(rid), "holder")


def hand_off(client: redis.Redis, keys: RedisKeys, holder: str, rids: list[str],
             write: Callable[[redis.client.Pipeline, list[str]], None]) -> list[str]:
    """Hand requests on from the stage `holder`: `write(pipe, held)` queues the moves of
    those of `rids` it still holds, and they commit in one transaction only if none of
    their records changed since the check. A router may have resumed a request meanwhile
    (it took the holder for dead): the stage then no longer holds it and must not hand it
    on, or the request would run twice and the two copies write the same KV. Returns the
    ids handed on; `write` may run again (the check is retried when a record changed)."""
    watched = [keys.req(rid) for rid in rids]
    while True:
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(*watched)
                reads = client.pipeline(transaction=False)
                for rid in rids:
                    read_holder(reads, keys, rid)
                held = [rid for rid, h in zip(rids, reads.execute(), strict=True)
                        if h is not None and h.decode() == holder]
                pipe.multi()
                write(pipe, held)
                pipe.execute()
                return held
            except redis.WatchError:
                continue


def set_kv_location(client: redis.Redis, keys: RedisKeys, rid: str, slots: list[int],
                    node: str) -> None:
    """The request's KV moved to `node`'s store (a cross-node pull): whoever frees it later
    (its holder, or a router resuming it) frees it there."""
    client.hset(keys.req(rid), mapping={"slots": " ".join(map(str, slots)), "node": node})


# Moves between stages. Each is one script: atomic in Redis, so the request is always in
# exactly one place (a queue, or a live holder's hands) whoever dies when.
_CLAIM_PREFILL = """
local got = {}
for _, rid in ipairs(redis.call('lpop', KEYS[1], ARGV[3]) or {}) do
  local rec = ARGV[1] .. 'req:' .. rid
  if redis.call('sismember', KEYS[2], rid) == 1 then
    redis.call('del', rec)
  elseif redis.call('exists', rec) == 1 and redis.call('hsetnx', rec, 'holder', ARGV[2]) == 1 then
    table.insert(got, rid)
  end
end
return got
"""
_ASSIGN = """
local out = {0}
for i = 3, #ARGV do
  local rid = ARGV[i]
  if redis.call('zrem', KEYS[1], rid) == 1 then
    redis.call('zrem', KEYS[2], rid)
    if redis.call('sismember', KEYS[3], rid) == 1 then
      local rec = ARGV[1] .. 'req:' .. rid
      table.insert(out, rid .. ' ' .. (redis.call('hget', rec, 'node') or ''))
      redis.call('del', rec)
    else
      redis.call('rpush', KEYS[4], rid)
      redis.call('hset', ARGV[1] .. 'req:' .. rid, 'holder', ARGV[2])
      out[1] = out[1] + 1
    end
  end
end
if out[1] > 0 then redis.call('publish', KEYS[5], ARGV[2]) end
return out
"""
_TAKE_OVER = """
if redis.call('hget', KEYS[1], 'holder') ~= ARGV[1] then return false end
redis.call('hset', KEYS[1], 'holder', ARGV[2])
return redis.call('hget', KEYS[1], 'node') or ''
"""
_RESUME = """
if redis.call('hget', KEYS[1], 'holder') ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[1], 'out', ARGV[2], 'slots', '', 'node', '')
redis.call('hdel', KEYS[1], 'holder')
redis.call('lpush', KEYS[2], ARGV[3])
redis.call('publish', KEYS[3], 'prefill')
return 1
"""


_ABORT = """
redis.call('sadd', KEYS[1], ARGV[1])
redis.call('expire', KEYS[1], ARGV[2])
redis.call('publish', KEYS[2], ARGV[1])
redis.call('expire', KEYS[6], ARGV[3])
local queued = redis.call('lrem', KEYS[3], 1, ARGV[1])
local indexed = redis.call('zrem', KEYS[4], ARGV[1])
redis.call('zrem', KEYS[5], ARGV[1])
local node = redis.call('hget', KEYS[7], 'node') or ''
if queued + indexed > 0 then redis.call('del', KEYS[7]) end
if indexed == 1 then return node end
return false
"""
ABORTED_TTL_S = 3600  # how long an aborted id is remembered (stages check it at hand-off)


def abort(client: redis.Redis | aioredis.Redis, keys: RedisKeys, rid: str) -> Any:
    """Mark `rid` aborted, tell the compute replicas (pub/sub), and take it out of the queue
    that holds it, if one does; the stage holding it otherwise frees its KV when it sees
    the mark. When the decode index held it, returns the node whose store holds its KV (the
    caller frees it there), else None; awaitable on an asyncio client."""
    return client.register_script(_ABORT)(
        keys=[keys.aborted, keys.abort_channel, keys.prefill, keys.decode,
              keys.decode_arrival, keys.tok(rid), keys.req(rid)],
        args=[rid, ABORTED_TTL_S, STREAM_TTL_S])


_ADMIT = """
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('zremrangebyscore', KEYS[3], '-inf', now - tonumber(ARGV[3]))
local waiting = redis.call('llen', KEYS[1]) + redis.call('zcard', KEYS[2])
  + redis.call('zcard', KEYS[3])
if waiting >= tonumber(ARGV[2]) then return {0, waiting} end
redis.call('zadd', KEYS[3], now, ARGV[1])
return {1, waiting}
"""
ADMIT_HOLD_S = 10.0  # an admitted request not queued within this long stops counting


def reserve_admission(client: redis.Redis | aioredis.Redis, keys: RedisKeys, rid: str,
                      max_queued: int) -> Any:
    """Reserve a place for `rid` among the requests waiting (prefill queue, decode index,
    admitted but not yet enqueued) if fewer than `max_queued` wait: one script, so
    concurrent arrivals on any number of routers cannot all pass the same count. Returns
    [1 if admitted else 0, how many waited]; awaitable on an asyncio client. Enqueueing
    the request (`enqueue`) releases the reservation; an abandoned one lapses after
    `ADMIT_HOLD_S`."""
    return client.register_script(_ADMIT)(
        keys=[keys.prefill, keys.decode, keys.admitting],
        args=[rid, max_queued, ADMIT_HOLD_S])


def enqueue(pipe: redis.client.Pipeline, keys: RedisKeys, rec: RequestRecord) -> None:
    """Queue an admitted request for prefill (its record first), releasing its place, and
    wake the idle stages that claim prompts (the work channel)."""
    put_record(pipe, keys, rec)
    pipe.rpush(keys.prefill, rec.request_id)
    pipe.zrem(keys.admitting, rec.request_id)
    pipe.publish(keys.work_channel, "prefill")


def claim_prefill(client: redis.Redis, keys: RedisKeys, worker: str, n: int) -> list[str]:
    """Pop up to `n` request ids off the prefill queue and make `worker` their holder.
    Skips ids that are aborted, gone, or already held (a retried push may repeat one)."""
    got = client.register_script(_CLAIM_PREFILL)(
        keys=[keys.prefill, keys.aborted], args=[keys.prefix, worker, n])
    return [x.decode() for x in got]


def assign(client: redis.Redis, keys: RedisKeys, replica: str,
           rids: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """Move `rids` from the decode index to `replica`'s inbox and make it their holder; ids
    no longer in the index are skipped (someone else took them). Returns how many moved,
    and (id, node of its KV) of those aborted meanwhile: the caller frees their KV (their
    records are deleted)."""
    n, *aborted = client.register_script(_ASSIGN)(
        keys=[keys.decode, keys.decode_arrival, keys.aborted, keys.inbox(replica),
              keys.work_channel], args=[keys.prefix, replica, *rids])
    return int(n), [tuple(x.decode().split(" ", 1)) for x in aborted]


def take_over(client: redis.Redis | aioredis.Redis, keys: RedisKeys, rid: str, holder: str,
              taker: str) -> Any:
    """The first half of resuming a request whose holder looks dead: make `taker` its
    holder, so the old one (should it be alive after all) can no longer hand it on
    (`hand_off`) and its KV can be freed safely. Returns the node of its store KV ("" if
    none yet), or None if `holder` no longer holds it (it moved on: its KV is in use).
    `resume(..., taker, ...)` then queues it again. Awaitable on an asyncio client."""
    return client.register_script(_TAKE_OVER)(keys=[keys.req(rid)], args=[holder, taker])


def resume(client: redis.Redis | aioredis.Redis, keys: RedisKeys, rid: str, holder: str,
           output_ids: tuple[int, ...]) -> Any:
    """Put a request its holder can no longer serve (the holder died, or the KV it was
    pulling from another node is gone) back at the head of the prefill queue, with the
    output its client already has: a worker recomputes prompt + output and it continues.
    Truthy if it moved; falsy if `holder` no longer holds it (it finished, or someone
    resumed it). Awaitable on an asyncio client."""
    return client.register_script(_RESUME)(
        keys=[keys.req(rid), keys.prefill, keys.work_channel],
        args=[holder, json.dumps(list(output_ids)), rid])


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


@dataclass(frozen=True)
class ReplicaState:
    """What a compute replica publishes about itself (`p replicas`), every ~0.1 s."""

    replica: str  # replica id ("r-…"); its prefetch worker has the same id
    ts: float  # time.time() seconds when published; stale states get no work
    requests: int = 0  # requests the replica's engine holds
    running: int = 0  # in the running batch
    pooled: int = 0  # swapped out or waiting in its host pool
    waiting: int = 0  # not yet admitted
    free: int = 0  # requests the leader may still assign (0 while draining)
    kv_usage: float = 0.0  # device KV pool in use, 0..1
    prefetch_hit_rate: float | None = None  # steps whose KV had already landed
    switches: int = 0  # batch switches so far
    prefill: str = "worker"  # who prefills its requests: "worker" or "replica" (prefill_on)
    node: str = ""  # Ray node id it runs on (its prefetch worker uses that node's store)
    # Ray actors whose death ends this replica (itself, its prefetch worker): the router
    # asks Ray about them when the state stops refreshing (`deployments/liveness.py`).
    actors: tuple[str, ...] = ()
    namespace: str = ""  # their Ray namespace
    pids: tuple[int, ...] = ()  # their processes, in the same order (for operators)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> ReplicaState:
        d = json.loads(raw)
        d["actors"], d["pids"] = tuple(d.get("actors", ())), tuple(d.get("pids", ()))
        return cls(**d)


def publish_state(client: redis.Redis, keys: RedisKeys, state: ReplicaState,
                  wake: bool = True) -> None:
    """Publish a replica's state, and wake the dispatch (`wake`: its room changed)."""
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.replicas, state.replica, state.to_json())
    if wake:
        wake_dispatch(pipe, keys)
    pipe.execute()


def load_states(client: redis.Redis, keys: RedisKeys) -> list[ReplicaState]:
    return [ReplicaState.from_json(v) for v in client.hgetall(keys.replicas).values()]


def claim_queue(client: redis.Redis, keys: RedisKeys, stale_after_s: float) -> int:
    """Make a starting deployment the owner of its queue (`keys.prefix` on this Redis).

    Replica states younger than `stale_after_s` mean another deployment is alive there:
    raises ValueError rather than sharing it. Otherwise everything under the prefix was
    left by a deployment that stopped uncleanly (its replica registrations, request
    records, streams, queues) and would poison this one: it is deleted. Returns how many
    keys were removed."""
    now = time.time()
    live = [s.replica for s in load_states(client, keys) if now - s.ts < stale_after_s]
    if live:
        raise ValueError(
            f"the queue {keys.prefix!r} on this Redis is in use by a running deployment "
            f"(replicas {', '.join(sorted(live))}); stop it or choose another redis_prefix")
    exact, patterns = keys.owned()
    stale = [k for k in exact if client.exists(k)]
    for pattern in patterns:
        stale += client.scan_iter(match=pattern, count=1000)
    for i in range(0, len(stale), 1000):
        client.unlink(*stale[i:i + 1000])
    return len(stale)
