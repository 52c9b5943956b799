"""A local redis-server on loopback, for `alignedserve serve`, the benchmarks and the tests.

Started only when the configured URL points at loopback and nothing answers there. It runs
with an append-only file (`appendonly yes`, `appendfsync everysec`) in a private folder,
and a supervisor thread restarts it from that file if it dies, so the queue's records and
token streams survive a crash of the server process (up to the last second of writes). It
never outlives the process that started it: it is stopped on exit, and on Linux the kernel
sends it SIGTERM if that process dies without stopping it (kill -9). A password in the URL
becomes its `requirepass`.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import redis

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
log = logging.getLogger("alignedserve.redis")


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis answers at `url` (with its password, if any)."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent goes (Linux); elsewhere nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalRedis:
    """`with LocalRedis(url):` — a supervised redis-server for the URL's port, or nothing
    if one is up already (then it is not ours to manage)."""

    def __init__(self, url: str, restart_backoff_s: float = 0.5) -> None:
        self.url = url
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # times the supervisor brought it back
        self._backoff_s = restart_backoff_s
        self._dir: str | None = None  # the append-only file's folder (ours to remove)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if ping(self.url):
            return self
        u = urlparse(self.url)
        if u.hostname not in LOOPBACK:
            raise ConnectionError(f"no Redis answers at {self.url}, and it is not loopback")
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed (`make install` installs "
                                    "it with apt-get; or set redis_url to a running Redis)")
        self._dir = tempfile.mkdtemp(prefix="alignedserve-redis-")
        self._stopping.clear()
        self._spawn(timeout_s)
        self._supervisor = threading.Thread(target=self._supervise, name="redis-supervisor",
                                            daemon=True)
        self._supervisor.start()
        return self

    def _command(self) -> list[str]:
        u = urlparse(self.url)
        cmd = [str(shutil.which("redis-server")), "--bind", "127.0.0.1", "--port",
               str(u.port or 6379), "--dir", str(self._dir), "--save", "",
               "--appendonly", "yes", "--appendfsync", "everysec",
               "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
               "--loglevel", "warning"]
        if u.password:
            cmd += ["--requirepass", u.password]
        return cmd

    def _spawn(self, timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # a terminal's Ctrl-C must not stop it before the drain
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while not ping(self.url):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer at {self.url}")
            time.sleep(0.05)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            log.error("redis-server at %s exited (code %s); restarting it from its "
                      "append-only file", self.url, proc.returncode)
            try:
                self._spawn(timeout_s=30.0)
                self.restarts += 1
                log.warning("redis-server at %s is back (restart %d)", self.url,
                            self.restarts)
            except (OSError, RuntimeError, TimeoutError) as e:
                log.error("could not restart redis-server: %s; trying again", e)
                self._stopping.wait(self._backoff_s)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(timeout=5)
        self._supervisor = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
