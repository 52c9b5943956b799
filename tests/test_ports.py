"""`wait_until_bindable`: a restarted router waits for its port instead of letting Serve
try it once and block it for good."""

from __future__ import annotations

import socket
import threading
import time

from alignedserve.ports import free_port, wait_until_bindable


def test_returns_at_once_for_a_free_port():
    t0 = time.monotonic()
    assert wait_until_bindable("127.0.0.1", free_port(), timeout_s=5)
    assert time.monotonic() - t0 < 1


def test_waits_while_the_port_is_held_and_returns_once_it_is_released():
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    threading.Timer(0.6, holder.close).start()
    t0 = time.monotonic()
    assert wait_until_bindable("127.0.0.1", port, timeout_s=10, poll_s=0.05)
    assert 0.5 <= time.monotonic() - t0 < 5


def test_gives_up_after_the_timeout(caplog):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        t0 = time.monotonic()
        with caplog.at_level("WARNING"):
            assert not wait_until_bindable("127.0.0.1", port, timeout_s=0.4, poll_s=0.05)
        assert 0.4 <= time.monotonic() - t0 < 3
    assert "still in use" in caplog.text
