"""The router's `GenerationBackend` over the Redis global queue.

generate(): write the request record, queue it for prefill, then read its token stream.
One reader task per router multiplexes every open stream in a single blocking XREAD, so
hundreds of concurrent requests cost one Redis connection, not hundreds.
abort(): mark the request aborted, tell compute replicas (pub/sub), and take it out of
whichever Redis structure holds it; the stage that holds it frees its KV (see
global_queue/keys.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis

from alignedserve.deployments.router.backend import GenerateRequest
from alignedserve.deployments.router.openai_protocol import APIError
from alignedserve.global_queue.events import TokenEvent
from alignedserve.global_queue.index import unindex
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.global_queue.records import (
    ReplicaState,
    RequestRecord,
    put_record,
    read_holder,
)
from alignedserve.logs import rid as log_rid

log = logging.getLogger("alignedserve.router")
_BLOCK_MS = 50  # reader's XREAD block; new streams join within this long
_ABORTED_TTL_S = 3600
_POOL_SIZE = 32  # Redis connections per router for enqueue/abort (streams use one more)
_WATCH_EVERY_S = 2.0  # how often the reader checks that each request's holder is alive
_RETRY_AFTER_S = 2.0  # what a refused client is told to wait



class RedisBackend:
    def __init__(self, redis_url: str, keys: RedisKeys,
                 free_kv: Callable[[str], None] | None = None,
                 holder_timeout_s: float = 30.0, max_queued: int = 1 << 30) -> None:
        self.url = redis_url
        self.keys = keys
        self.free_kv = free_kv  # frees a request's KV-store blocks (when the router holds it)
        self.holder_timeout_s = holder_timeout_s  # a holder this silent is taken as dead
        self.max_queued = max_queued  # requests waiting for prefill or dispatch, at most
        # Blocking pool: a burst of requests waits for a connection instead of failing.
        self.r = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=_POOL_SIZE, timeout=None))
        self._reader_conn = aioredis.Redis.from_url(redis_url)
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._last_ids: dict[str, bytes] = {}
        self._reader: asyncio.Task | None = None
        self.started = time.time()

    # -- GenerationBackend ------------------------------------------------------------------

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid = req.request_id
        rec = RequestRecord(rid, req.prompt_token_ids, req.params, req.arrival_time)
        q: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._queues[rid] = q
        self._last_ids[rid] = b"0-0"
        self._ensure_reader()
        try:
            pipe = self.r.pipeline(transaction=False)
            put_record(pipe, self.keys, rec)
            pipe.rpush(self.keys.prefill, rid)
            await pipe.execute()
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

    async def admit(self) -> None:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(self.keys.prefill)
            pipe.zcard(self.keys.decode)
            waiting = sum(await pipe.execute())
        except aioredis.RedisError as e:
            raise APIError(f"the request queue is unavailable ({e}); retry later", 503,
                           code="queue_unavailable", retry_after_s=_RETRY_AFTER_S) from e
        if waiting >= self.max_queued:
            raise APIError(f"the server is at capacity ({waiting} requests queued); retry "
                           "later", 429, code="rate_limit_exceeded", type_="rate_limit_error",
                           retry_after_s=_RETRY_AFTER_S)

    async def abort(self, request_id: str) -> None:
        keys = self.keys
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(keys.aborted, request_id)
        pipe.expire(keys.aborted, _ABORTED_TTL_S)
        pipe.publish(keys.abort_channel, request_id)
        pipe.lrem(keys.prefill, 1, request_id)  # not prefilled yet: no KV anywhere
        unindex(pipe, keys, request_id)  # in the decode index: this router now holds it
        *_, in_prefill, in_index, _ = await pipe.execute()
        if in_prefill or in_index:
            await self.r.delete(keys.req(request_id))
        if in_index and self.free_kv is not None:
            self.free_kv(request_id)

    async def server_info(self) -> dict[str, object]:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.llen(self.keys.prefill)
            pipe.zcard(self.keys.decode)
            pipe.hlen(self.keys.replicas)
            prefill, decode, replicas = await pipe.execute()
        except aioredis.RedisError as e:
            raise APIError(f"the request queue is unavailable ({e})", 503,
                           code="queue_unavailable", retry_after_s=_RETRY_AFTER_S) from e
        return {"prefill_queue": prefill, "decode_index": decode, "replicas": replicas,
                "active_requests": len(self._queues), "uptime_s": time.time() - self.started}

    async def close(self) -> None:
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
        """Fail the requests whose holder (a compute replica, or its prefetch worker) has
        stopped publishing its state: the client gets an error instead of waiting forever,
        and their KV is freed (the dead holder cannot)."""
        rids = list(self._queues)
        pipe = self.r.pipeline(transaction=False)
        for rid in rids:
            read_holder(pipe, self.keys, rid)
        pipe.hgetall(self.keys.replicas)
        *holders, states = await pipe.execute()
        now = time.time()
        ages = {k.decode(): now - ReplicaState.from_json(v).ts for k, v in states.items()}
        for rid, holder in zip(rids, holders, strict=True):
            if holder is None or ages.get(holder.decode(), float("inf")) < self.holder_timeout_s:
                continue
            q = self._queues.get(rid)
            log.warning("holder %s silent for %.0f s: request failed", holder.decode(),
                        self.holder_timeout_s, extra=log_rid(rid))
            if q is not None:
                q.put_nowait(TokenEvent((), 0, error=f"replica {holder.decode()} failed while "
                                         "serving this request; it was not completed"))
            await self.abort(rid)
            if self.free_kv is not None:
                self.free_kv(rid)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_streams())

    async def _read_streams(self) -> None:
        watched = time.monotonic()
        while self._queues:
            if time.monotonic() - watched > _WATCH_EVERY_S:
                watched = time.monotonic()
                await self._check_holders()
            streams = {self.keys.tok(rid): last for rid, last in self._last_ids.items()}
            try:
                got = await self._reader_conn.xread(streams, block=_BLOCK_MS)
            except aioredis.RedisError as e:
                log.error("token stream reader: Redis unavailable (%s); failing %d open "
                          "requests", e, len(self._queues))
                for q in self._queues.values():
                    q.put_nowait(TokenEvent((), 0, error=f"queue unavailable: {e}"))
                return
            for key, entries in got or ():
                rid = key.decode().removeprefix(self.keys.tok(""))
                queue = self._queues.get(rid)
                if queue is None:
                    continue
                for entry_id, fields in entries:
                    self._last_ids[rid] = entry_id
                    queue.put_nowait(TokenEvent.from_fields(fields))
