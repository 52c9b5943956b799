"""Free TCP ports for the servers this project starts on loopback (tests, benchmarks).

Binding port 0 and closing it hands out an ephemeral port, and the server that later binds
it races everything else that binds port 0 meanwhile: Ray alone binds several per worker
(Serve replicas listen on `[::]:0`), and one of them taking the port kills the start
("Address already in use"). So ports are drawn from the gap between Ray's worker ports
(10002-19999 by default) and the kernel's ephemeral range, and checked free on every
interface.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

_LOW = 20000  # above Ray's default max_worker_port (19999)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _is_free(port: int) -> bool:
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family) as s:
                s.bind((host, port))
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (errno.EAFNOSUPPORT,
                                                         errno.EADDRNOTAVAIL):
                continue  # no IPv6 here
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now, outside the ranges Ray and the kernel hand out."""
    high = _ephemeral_low()
    if high - _LOW >= 1000:
        rng = random.Random()
        for _ in range(100):
            if _is_free(port := rng.randrange(_LOW, high)):
                return port
    with socket.socket() as s:  # no such gap on this machine: an ephemeral one
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_bindable(host: str, port: int, timeout_s: float, poll_s: float = 0.25) -> bool:
    """Wait until `host:port` can be bound the way Serve's direct ingress binds it (no
    SO_REUSEADDR, so a connection of the previous listener still in TIME_WAIT blocks it,
    for up to 60 s on Linux). Serve tries its one port once and, when the bind fails,
    blocks that port for good, so a router replaced right after being killed would never
    listen again. True once bindable; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, port))
            return True
        except OSError as e:
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                return e.errno != errno.EADDRINUSE  # anything else is Serve's to report
            if not warned:
                log.warning("port %s:%d is still in use (the previous listener's "
                            "connections); waiting up to %.0f s before serving on it",
                            host, port, timeout_s)
                warned = True
        time.sleep(poll_s)
