"""Runs the scheduler's KV transfers on a background thread, overlapping the model's steps.

One worker thread and a FIFO, so transfers finish in `seq` order (the scheduler relies on
it). The worker uses its own torch thread count (`copy_threads`, default 1) so that it does
not oversubscribe the cores the step computes on. On CUDA the same role falls to a
side stream with events (not exercised in CI: no GPU here).

Overlap accounting: `copy_s` is time the worker spent copying; `stall_s` is time the step
loop waited on a fence. overlap = 1 - stall_s / copy_s is the fraction of copy time hidden
behind compute.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from alignedserve.engine.kv_cache import PagedKVCache
from alignedserve.kv_store.host_pool import HostKVPool
from alignedserve.scheduling.interface import KVTransfer


@dataclass
class TransferStats:
    transfers: int = 0  # KVTransfers finished
    bytes: int = 0  # bytes copied, both directions
    copy_s: float = 0.0  # worker seconds spent copying
    stall_s: float = 0.0  # step-loop seconds spent waiting on fences

    @property
    def overlap(self) -> float | None:
        """Fraction of copy time hidden behind compute (None before any copy)."""
        return 1.0 - min(1.0, self.stall_s / self.copy_s) if self.copy_s > 0 else None


class TransferExecutor(Protocol):
    """Runs a scheduler's KVTransfers in the background, finishing them in `seq` order."""

    stats: TransferStats
    submitted: int  # highest seq handed to the executor so far

    def submit(self, transfers: tuple[KVTransfer, ...]) -> None: ...

    def poll(self) -> int:
        """The highest seq such that every transfer <= it is done; never blocks."""
        ...

    def wait(self, seq: int) -> float:
        """Block until every transfer <= `seq` is done; the seconds waited."""
        ...

    def close(self) -> None: ...


class KVTransferQueue:
    def __init__(self, cache: PagedKVCache, host: HostKVPool, copy_threads: int = 1) -> None:
        self.cache = cache
        self.host = host
        self.block_bytes = cache.kv[0].numel() * cache.kv.element_size()
        self.stats = TransferStats()
        self._pending: deque[tuple[int, Future[float]]] = deque()
        self._done_seq = 0
        self.submitted = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kv-transfer",
                                        initializer=torch.set_num_threads,
                                        initargs=(copy_threads,))

    def submit(self, transfers: tuple[KVTransfer, ...]) -> None:
        for t in transfers:
            self._pending.append((t.seq, self._pool.submit(self._copy, t)))
            self.submitted = t.seq
            self.stats.bytes += len(t.host_blocks) * self.block_bytes

    def _copy(self, t: KVTransfer) -> float:
        t0 = time.perf_counter()
        host, dev = list(t.host_blocks), list(t.device_blocks)
        if t.kind == "swap_in":
            self.host.read_into(host, self.cache.kv, dev)
        else:
            self.host.write_from(host, self.cache.kv, dev)
        return time.perf_counter() - t0

    def wait(self, seq: int) -> float:
        """Block until every transfer with seq <= `seq` is done; return the seconds waited."""
        if seq <= self._done_seq:
            return 0.0
        t0 = time.perf_counter()
        while self._pending and self._pending[0][0] <= seq:
            self._retire(*self._pending.popleft())
        stalled = time.perf_counter() - t0
        self.stats.stall_s += stalled
        return stalled

    def poll(self) -> int:
        """Retire finished transfers without blocking; return the highest seq all done."""
        while self._pending and self._pending[0][1].done():
            self._retire(*self._pending.popleft())
        return self._done_seq

    def _retire(self, seq: int, fut: Future[float]) -> None:
        self.stats.copy_s += fut.result()  # blocks if needed; re-raises a failed copy here
        self.stats.transfers += 1
        self._done_seq = seq

    def close(self) -> None:
        self._pool.shutdown(wait=True)
