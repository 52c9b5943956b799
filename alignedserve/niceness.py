"""Scheduling priority (niceness) of this process's threads. On Linux niceness belongs to a
thread, and a new thread starts with its creator's.

Ray starts its workers at nice 15. `ServeConfig.compute_nice` lowers it for the threads that
run model steps (a two-thread step waits at every op's barrier for a preempted thread) and
for the router's process, whose admission and token streaming otherwise wait behind those
threads whenever both cores are busy. Lowering niceness needs CAP_SYS_NICE; without it the
old value is kept and the refusal logged.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("alignedserve.niceness")


def _set(tid: int, nice: int, what: str) -> bool:
    """Thread `tid` at `nice`; False (logged) when refused. A thread that has ended raises
    ProcessLookupError."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except ProcessLookupError:
        raise
    except (OSError, AttributeError) as e:  # no CAP_SYS_NICE, or not Linux
        log.warning("%s keeps nice %s (could not set %d: %s)", what,
                    os.getpriority(os.PRIO_PROCESS, 0), nice, e)
        return False
    return True


def set_thread_nice(nice: int, what: str) -> bool:
    """This thread's niceness (threads it starts later inherit it). False when refused."""
    return _set(threading.get_native_id(), nice, what)


def set_process_nice(nice: int, what: str) -> int:
    """Every current thread of this process at `nice` (/proc/self/task); returns how many
    took it. A refusal is logged once."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: this thread only
        return int(set_thread_nice(nice, what))
    done = 0
    for tid in tids:
        try:
            if not _set(tid, nice, what):
                break
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        done += 1
    return done
