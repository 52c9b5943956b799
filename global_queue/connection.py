"""Redis clients that ride out a Redis restart.

The local redis-server is supervised (restarted with its AOF, `redis_server.py`); while it
is down, a command on a `patient` client is retried by redis-py (exponential backoff, capped
at 1 s) for up to `outage_s` seconds before it raises. Compute replicas, prefetch workers,
the leader and the router's token-stream reader are patient: they pause and continue where
they were. The router's request path is not: a new request gets 503 at once instead of
waiting on a queue that is down.

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

_BACKOFF_CAP_S = 1.0
_RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError]


def _retries(outage_s: float) -> int:
    # 0.05, 0.1, 0.2, ... then 1 s per try: about `outage_s` seconds in all.
    return max(1, int(outage_s / _BACKOFF_CAP_S) + 5)


def connect(url: str, outage_s: float = 0.0) -> redis.Redis:
    """A client; `outage_s` > 0 makes it patient for that long."""
    if outage_s <= 0:
        return redis.Redis.from_url(url)
    return redis.Redis.from_url(
        url, retry=Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05),
                         _retries(outage_s)),
        retry_on_error=_RETRY_ON, health_check_interval=10)


def connect_async(url: str, outage_s: float = 0.0,
                  max_connections: int | None = None) -> aioredis.Redis:
    """The asyncio twin of `connect`; `max_connections` makes a blocking pool (callers
    wait for a connection instead of failing)."""
    kw: dict[str, object] = {}
    if outage_s > 0:
        kw = {"retry": aioredis.retry.Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.05),
                                            _retries(outage_s)),
              "retry_on_error": _RETRY_ON}
    if max_connections is None:
        return aioredis.Redis.from_url(url, **kw)
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                                    timeout=None, **kw)
    return aioredis.Redis(connection_pool=pool)
