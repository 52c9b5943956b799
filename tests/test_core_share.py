"""A compute replica and its prefetch worker share the node's cores through the device
arena's header: split widens a side only while the other idles; alternate takes turns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import torch

from alignedserve.prefetch_workers.cores import (
    HEADER_REPLICA_BUSY,
    HEADER_TURN,
    HEADER_WORKER_BUSY,
    CoreShare,
)


def _pair(mode: str, max_wait_s: float = 5.0) -> tuple[torch.Tensor, CoreShare, CoreShare]:
    header = torch.zeros(8, dtype=torch.int64)  # the arena header (slot 0: transfer fence)
    replica = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 1, 2, mode, max_wait_s)
    worker = CoreShare(header, HEADER_WORKER_BUSY, HEADER_REPLICA_BUSY, 1, 2, mode, max_wait_s)
    return header, replica, worker


def test_split_each_side_widens_only_while_the_other_idles():
    before = torch.get_num_threads()
    header, replica, worker = _pair("split")
    try:
        assert replica.before_step() == 2, "decode tail: no prompt to prefill"
        assert torch.get_num_threads() == 2 and header[HEADER_REPLICA_BUSY] == 1
        assert worker.before_step() == 1, "the replica is decoding: one core each"
        assert replica.before_step() == 1, "a prompt arrived: the replica gives a core back"
        worker.set_busy(False)
        assert replica.before_step() == 2 and header[HEADER_WORKER_BUSY] == 0
        replica.set_busy(False)
        assert worker.before_step() == 2, "a burst with nothing to decode: the worker widens"
        assert header[0] == 0, "the transfer fence slot is left alone"
    finally:
        torch.set_num_threads(before)


def test_alternate_takes_turns_while_both_are_busy():
    before = torch.get_num_threads()
    header, replica, worker = _pair("alternate")
    order: list[str] = []
    try:
        replica.set_busy(True)
        worker.set_busy(True)
        header[HEADER_TURN] = HEADER_WORKER_BUSY  # the worker's step is next

        def run(side: CoreShare, name: str) -> None:
            for _ in range(3):
                assert side.before_step() == 2, "a turn gets every thread"
                order.append(name)
                time.sleep(0.01)
                side.after_step()
            side.set_busy(False)

        threads = [threading.Thread(target=run, args=(s, n))
                   for s, n in ((replica, "replica"), (worker, "worker"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert order == ["worker", "replica"] * 3, order
    finally:
        torch.set_num_threads(before)


def test_alternate_goes_ahead_when_the_partner_idles_or_hangs():
    before = torch.get_num_threads()
    header, replica, worker = _pair("alternate", max_wait_s=0.2)
    try:
        header[HEADER_TURN] = HEADER_WORKER_BUSY
        t0 = time.monotonic()
        assert replica.before_step() == 2 and time.monotonic() - t0 < 0.1, "worker idle"
        worker.set_busy(True)  # ... and then never steps: a partner that died mid-turn
        t0 = time.monotonic()
        replica.before_step()
        assert 0.15 < time.monotonic() - t0 < 2.0 and replica.waited_s >= 0.15
    finally:
        torch.set_num_threads(before)


def test_pair_threads_never_shrink_a_side_below_its_own():
    header = torch.zeros(8, dtype=torch.int64)
    before = torch.get_num_threads()
    try:
        side = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 2, 1, "split")
        assert side.before_step() == 2
    finally:
        torch.set_num_threads(before)


def _first_step_in_a_thread(share: CoreShare) -> int:
    """Run the first before_step on a fresh thread (as the decode loop does); its niceness."""
    got: list[int] = []

    def run() -> None:
        before = torch.get_num_threads()
        try:
            share.before_step()
            got.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        finally:
            torch.set_num_threads(before)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return got[0]


def test_the_computing_thread_takes_compute_nice_and_only_it():
    header = torch.zeros(8, dtype=torch.int64)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    share = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 1, 2, nice=mine + 3)
    assert _first_step_in_a_thread(share) == mine + 3  # raising nice needs no privilege
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # this (another) thread is untouched
    keep = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 1, 2, nice=None)
    assert _first_step_in_a_thread(keep) == mine


def test_process_nice_reaches_every_thread():
    """In a child process (niceness raised cannot be lowered back without privilege): every
    thread, started before the call, takes it; a refusal is logged, not raised."""
    code = textwrap.dedent("""
        import json, os, threading, logging
        from alignedserve.niceness import set_process_nice
        stop = threading.Event()
        ts = [threading.Thread(target=stop.wait) for _ in range(3)]
        for t in ts: t.start()
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        n = set_process_nice(mine + 2, "test")
        got = {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}
        logging.basicConfig()
        def refuse(*_): raise PermissionError("no CAP_SYS_NICE")
        os.setpriority = refuse
        refused = set_process_nice(mine - 5, "test")
        stop.set()
        print(json.dumps([n, sorted(got), mine + 2, refused]))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    n, got, want, refused = json.loads(run.stdout)
    assert n == 4 and got == [want] and refused == 0, run.stdout
    assert "test keeps nice" in run.stderr and "could not set" in run.stderr


def test_a_refused_priority_is_logged_and_the_step_goes_on(monkeypatch, caplog):
    def refuse(*_: object) -> None:
        raise PermissionError("no CAP_SYS_NICE")

    monkeypatch.setattr(os, "setpriority", refuse)
    header = torch.zeros(8, dtype=torch.int64)
    share = CoreShare(header, HEADER_REPLICA_BUSY, HEADER_WORKER_BUSY, 1, 2, nice=-5)
    with caplog.at_level("WARNING"):
        _first_step_in_a_thread(share)
    assert "could not set -5" in caplog.text and header[HEADER_REPLICA_BUSY] == 1
