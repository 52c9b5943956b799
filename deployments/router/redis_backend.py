"""The router's `GenerationBackend` over the Redis global queue.

generate(): write the request record, queue it for prefill, then read its token stream.
One reader task per router multiplexes every open stream in a single blocking XREAD, so
hundreds of concurrent requests cost one Redis connection, not hundreds.
abort(): mark the request aborted, tell compute replicas (pub/sub), and take it out of
whichever Redis structure holds it; the stage that holds it frees its KV (see
global_queue/keys.py).

Failures: every second the reader checks the holders of its open requests. A holder whose
state stopped refreshing and that Ray reports dead (or that stayed silent past
`holder_timeout_s`) has its requests resumed: their KV is freed and they go back to the head
of the prefill queue with the output already streamed, so a live worker recomputes it and
the stream continues. Events carry their cumulative token count, so a token published twice
(a zombie holder, a retried write) is dropped here and the client sees each token once.
While Redis is down the reader waits for it (up to `outage_s`), then fails what it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from alignedserve.deployments.router.backend import GenerateRequest
from alignedserve.deployments.router.openai_protocol import APIError
from alignedserve.global_queue.connection import connect_async
from alignedserve.global_queue.events import TokenEvent, replay
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.records import (
    ReplicaState,
    RequestRecord,
    abort,
    enqueue,
    read_holder,
    reserve_admission,
    resume,
    take_over,
)
from alignedserve.logs import rid as log_rid

log = logging.getLogger("alignedserve.router")
_BLOCK_MS = 50  # reader's XREAD block; new streams join within this long
_POOL_SIZE = 32  # Redis connections per router for enqueue/abort (streams use one more)
_WATCH_EVERY_S = 1.0  # how often the reader checks that each request's holder is alive
_ASK_RAY_AFTER_S = 1.0  # a holder state this old makes the router ask Ray if it is alive
_RETRY_AFTER_S = 2.0  # what a refused client is told to wait
_OUTAGE_BACKOFF_S = (0.1, 1.0)  # the reader's wait between tries while Redis is down


class RedisBackend:
    def __init__(self, redis_url: str, keys: RedisKeys,
                 free_kv: Callable[[str, str], object] | None = None,
                 holder_timeout_s: float = 30.0, max_queued: int = 1 << 30,
                 holder_alive: Callable[[ReplicaState], bool] | None = None,
                 outage_s: float = 60.0) -> None:
        self.url = redis_url
        self.keys = keys
        self.free_kv = free_kv  # (request id, node): frees its KV in that node's store
        self.holder_timeout_s = holder_timeout_s  # a holder this silent is taken as dead
        self.holder_alive = holder_alive  # asks Ray (blocking; run in a thread)
        self.max_queued = max_queued  # requests waiting for prefill or dispatch, at most
        self.outage_s = outage_s  # open streams wait this long for Redis to come back
        # Blocking pool: a burst of requests waits for a connection instead of failing.
        # Not patient: while Redis is down a new request is refused at once (503).
        self.r = connect_async(redis_url, max_connections=_POOL_SIZE)
        self._reader_conn = connect_async(redis_url)
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._last_ids: dict[str, bytes] = {}
        self._delivered: dict[str, int] = {}  # request id -> output tokens passed on
        self._ended: list[str] = []  # to drop from this router's routed set
        self.resumed = 0  # requests resumed after their holder died
        # Open requests are listed under this router's id; if it dies (its heartbeat, sent
        # by its leader loop, stops) the leader aborts them and frees their KV.
        self.router_id = f"rt-{uuid.uuid4().hex[:8]}"
        self._reader: asyncio.Task | None = None
        self.started = time.time()

    # -- GenerationBackend ------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid = req.request_id
        rec = RequestRecord(rid, req.prompt_token_ids, req.params, req.arrival_time)
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._queues[rid] = q
        self._last_ids[rid] = b"0-0"
        self._delivered[rid] = 0
        try:
            pipe = self.r.pipeline(transaction=False)
            enqueue(pipe, self.keys, rec)
            if self._ended:  # requests that ended since: off this router's list
                ended, self._ended = self._ended, []
                pipe.srem(self.keys.routed(self.router_id), *ended)
            pipe.sadd(self.keys.routed(self.router_id), rid)
            try:
                await pipe.execute()
            except aioredis.RedisError as e:
                raise _unavailable(e) from e
            self._ensure_reader()
            log.info("accepted: %d prompt tokens, max_tokens %d", len(req.prompt_token_ids),
                     req.params.max_tokens, extra=log_rid(rid))
            while True:
                ev = await q.get()
                yield ev
                if ev.final:
                    return
        finally:
            self._queues.pop(rid, None)
            self._last_ids.pop(rid, None)
            self._delivered.pop(rid, None)
            self._ended.append(rid)

    async def admit(self, request_id: str) -> None:
        try:
            admitted, waiting = await reserve_admission(self.r, self.keys, request_id,
                                                        self.max_queued)
        except aioredis.RedisError as e:
            raise _unavailable(e) from e
        if not admitted:
            raise APIError(f"the server is at capacity ({waiting} requests queued); retry "
                           "later", 429, code="rate_limit_exceeded", type_="rate_limit_error",
                           retry_after_s=_RETRY_AFTER_S)

    async def abort(self, request_id: str) -> None:
        node = await abort(self.r, self.keys, request_id)
        if node is not None and self.free_kv is not None:
            self.free_kv(request_id, node.decode())  # it was in the decode index: ours

    async def server_info(self) -> dict[str, object]:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(self.keys.prefill)
            pipe.zcard(self.keys.decode)
            pipe.hlen(self.keys.replicas)
            prefill, decode, replicas = await pipe.execute()
        except aioredis.RedisError as e:
            raise _unavailable(e) from e
        return {"prefill_queue": prefill, "decode_index": decode, "replicas": replicas,
                "active_requests": len(self._queues), "resumed_requests": self.resumed,
                "uptime_s": time.time() - self.started}

    async def close(self) -> None:
        # If Redis is down, the leader's sweep drops this router's set once its heartbeat
        # stops.
        with contextlib.suppress(aioredis.RedisError):
            await self._forget_ended()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass  # what cancel() asked for
            except Exception:
                log.exception("token stream reader had failed")
        await self.r.aclose()
        await self._reader_conn.aclose()

    # -- the stream reader ------------------------------------------------------------------

    async def _check_holders(self) -> None:
        """Resume the open requests whose holder (a compute replica, or its prefetch
        worker) is dead: Ray reports it dead, or its state is gone or silent past
        `holder_timeout_s`."""
        rids = list(self._queues)
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            read_holder(pipe, self.keys, rid)
        pipe.hgetall(self.keys.replicas)
        *holders, raw = await pipe.execute()
        states = {k.decode(): ReplicaState.from_json(v) for k, v in raw.items()}
        dead: dict[str, bool] = {}
        for rid, holder in zip(rids, holders, strict=True):
            if holder is None:  # in a queue: nobody to lose it
                continue
            h = holder.decode()
            if h not in dead:
                dead[h] = await self._is_dead(states.get(h))
            if dead[h] and rid in self._queues:
                st = states.get(h)
                await self._resume(rid, h, st.node if st is not None else "")

    async def _forget_ended(self) -> None:
        if self._ended:
            ended, self._ended = self._ended, []
            await self.r.srem(self.keys.routed(self.router_id), *ended)

    async def _is_dead(self, st: ReplicaState | None) -> bool:
        if st is None:  # withdrawn (its worker died) or never there: nothing will serve it
            return True
        age = time.time() - st.ts
        if age >= self.holder_timeout_s:
            return True
        if age < _ASK_RAY_AFTER_S or self.holder_alive is None or not st.actors:
            return False
        return not await asyncio.to_thread(self.holder_alive, st)

    async def _resume(self, rid: str, holder: str, holder_node: str) -> None:
        """Take the request from its dead holder, free its KV and queue it again with the
        output its client has. The KV is freed where the record says it is and on the
        holder's node (a holder that died while pulling it from another node may have got
        part of it): only after the take-over, so a holder that was only slow cannot hand
        the request on with KV freed under it; and before it is queued, so no new holder
        has allocated under the same id yet."""
        taker = f"{self.router_id}:resuming"  # a holder no state names: dead if we stall
        node = await take_over(self.r, self.keys, rid, holder, taker)
        if node is None:
            return  # no longer held by `holder`: it moved on or ended
        out, final = replay(await self.r.xrange(self.keys.tok(rid)))
        if self.free_kv is not None:
            for where in {node.decode(), holder_node} - {""}:
                self.free_kv(rid, where)
        if final:  # it ended just now (the reader passes the end on): drop what is left
            await self.r.delete(self.keys.req(rid))
            return
        if not await resume(self.r, self.keys, rid, taker, tuple(out)):
            return  # aborted meanwhile
        # Should the holder only have been slow, it drops the request (no double work).
        await self.r.publish(self.keys.abort_channel, f"{rid}@{holder}")
        await self.r.hincrby(self.keys.counters, "resumed", 1)
        self.resumed += 1
        log.warning("holder %s is dead: resumed after %d tokens", holder, len(out),
                    extra=log_rid(rid))

    def _ensure_reader(self) -> None:
        # The reader exits when no stream is open, without awaiting anything after that
        # check: a stream opened meanwhile then always finds it done and starts another.
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_streams())

    async def _read_streams(self) -> None:
        watched = time.monotonic()
        down_since: float | None = None
        while self._queues:
            try:
                if time.monotonic() - watched > _WATCH_EVERY_S:
                    watched = time.monotonic()
                    await self._check_holders()
                    await self._forget_ended()
                streams = {self.keys.tok(rid): last for rid, last in self._last_ids.items()}
                got = await self._reader_conn.xread(streams, block=_BLOCK_MS)
            except aioredis.RedisError as e:
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    log.error("token stream reader: Redis unavailable (%s); %d open requests "
                              "wait up to %.0f s for it", e, len(self._queues), self.outage_s)
                if now - down_since > self.outage_s:
                    for q in self._queues.values():
                        q.put_nowait(TokenEvent((), 0, error=f"queue unavailable: {e}"))
                    return
                await asyncio.sleep(min(_OUTAGE_BACKOFF_S[1],
                                        _OUTAGE_BACKOFF_S[0] * 2 ** int(now - down_since)))
                continue
            if down_since is not None:
                log.info("token stream reader: Redis is back after %.1f s",
                         time.monotonic() - down_since)
                down_since = None
            for key, entries in got or ():
                rid = key.decode().removeprefix(self.keys.tok(""))
                if rid in self._queues:
                    self._deliver(rid, entries)

    def _deliver(self, rid: str, entries: list) -> None:
        """Pass new events on; tokens already passed on (counted by `n`) are dropped."""
        queue = self._queues[rid]
        for entry_id, fields in entries:
            self._last_ids[rid] = entry_id
            ev = TokenEvent.from_fields(fields).past(self._delivered[rid])
            if ev is None:
                continue
            if ev.token_ids:
                self._delivered[rid] = ev.num_output_tokens
            queue.put_nowait(ev)

def _unavailable(e: Exception) -> APIError:
    return APIError(f"the request queue is unavailable ({e}); retry later", 503,
                    code="queue_unavailable", retry_after_s=_RETRY_AFTER_S)
