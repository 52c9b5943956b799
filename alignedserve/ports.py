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
import random
import socket
from pathlib import Path

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
