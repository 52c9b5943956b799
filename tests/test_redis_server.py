"""The local redis-server the CLI starts: append-only, restarted from its file when it
dies, password from the URL, and never outliving the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from alignedserve.global_queue.redis_server import LocalRedis, ping
from alignedserve.ports import free_port


def _wait(cond, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_redis_is_restarted_with_its_data_and_password():
    url = f"redis://:pw0@127.0.0.1:{free_port()}/0"
    with LocalRedis(url) as srv:
        r = redis.Redis.from_url(url)
        r.set("k", "v")
        r.xadd("s", {"ids": "1 2"})
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(":pw0@", ":wrong@")).ping()
        time.sleep(1.5)  # appendfsync everysec: the writes are on disk now
        pid = srv.proc.pid
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: srv.restarts == 1 and ping(url))
        assert srv.proc.pid != pid
        assert r.get("k") == b"v" and r.xlen("s") == 1  # redis-py reconnects by itself
    assert not ping(url)  # stopped with its owner's context


def test_redis_dies_with_the_process_that_started_it():
    url = f"redis://127.0.0.1:{free_port()}/0"
    code = ("import time; from alignedserve.global_queue.redis_server import LocalRedis; "
            f"LocalRedis({url!r}).start(); print('up', flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "up" and ping(url)
        owner.send_signal(signal.SIGKILL)  # no chance to stop it
        owner.wait(timeout=30)
        assert _wait(lambda: not ping(url), 10.0), "redis-server outlived its owner"
    finally:
        owner.kill()


def test_the_router_answers_503_with_retry_after_while_redis_is_down():
    import asyncio

    from alignedserve.deployments.router.openai_protocol import APIError
    from alignedserve.deployments.router.redis_backend import RedisBackend
    from alignedserve.global_queue.keys import RedisKeys

    async def main() -> list[APIError]:
        backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", RedisKeys("t:"))  # nobody
        errors = []
        for call in (lambda: backend.admit("r-1"), backend.server_info):
            with pytest.raises(APIError) as e:
                await call()
            errors.append(e.value)
        await backend.close()
        return errors

    for err in asyncio.run(main()):
        assert err.status == 503 and err.code == "queue_unavailable"
        assert err.headers() == {"Retry-After": "2"}
