"""A local redis-server on loopback, for `alignedserve serve` and the tests.

Started only when the configured URL points at loopback and nothing answers there. It keeps
no data on disk (the queue is rebuilt by clients; a restart loses in-flight requests only).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from urllib.parse import urlparse

import redis

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ping(url: str, timeout_s: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


class LocalRedis:
    """`with LocalRedis(url):` — a redis-server for the URL's port, or nothing if one is up."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if ping(self.url):
            return self
        u = urlparse(self.url)
        if u.hostname not in LOOPBACK:
            raise ConnectionError(f"no Redis answers at {self.url}, and it is not loopback")
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (`make install` installs "
                                    "it with apt-get; or set redis_url to a running Redis)")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(u.port or 6379), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)  # a terminal's Ctrl-C must not stop it before the drain
        deadline = time.monotonic() + timeout_s
        while not ping(self.url):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer at {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
