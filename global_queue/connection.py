"""Redis clients that ride out a Redis restart.

The local redis-server is supervised (restarted with its AOF, `redis_server.py`); while it
is down, a command on a patient client (`outage_s` > 0) is retried by redis-py (exponential
backoff, capped at 1 s) for up to `outage_s` seconds before it raises. Compute replicas,
prefetch workers, the leader and the router's token-stream reader are patient: they pause
and continue where they were. The router's request path is not: a new request gets 503 at
once instead of waiting on a queue that is down. Impatient clients still retry twice
within ~0.2 s, enough to replace a pooled connection that a restart left stale.

Retried commands are at-least-once: a pipeline cut off mid-way may run again. The readers
are idempotent where that matters (token events carry their cumulative count, stages claim
requests with scripts that check the holder).
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

_BACKOFF_CAP_S = 1.0  # patient clients: at most this long between tries
_RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError]


def _backoff(outage_s: float) -> tuple[ExponentialBackoff, int]:
    if outage_s <= 0:
        return ExponentialBackoff(cap=0.1, base=0.05), 2
    # 0.05, 0.1, 0.2, ... then 1 s per try: about `outage_s` seconds in all.
    return ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05), int(outage_s) + 5


def connect(url: str, outage_s: float = 0.0) -> redis.Redis:
    """A client; `outage_s` > 0 makes it patient for that long."""
    return redis.Redis.from_url(url, retry=Retry(*_backoff(outage_s)),
                                retry_on_error=_RETRY_ON)


def connect_async(url: str, outage_s: float = 0.0,
                  max_connections: int | None = None) -> aioredis.Redis:
    """The asyncio twin of `connect`; `max_connections` makes a blocking pool (callers
    wait for a connection instead of failing)."""
    kw: dict[str, object] = {"retry": aioredis.retry.Retry(*_backoff(outage_s)),
                             "retry_on_error": _RETRY_ON}
    if max_connections is None:
        return aioredis.Redis.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                    timeout=None, **kw)
    return aioredis.Redis(connection_pool=pool)
