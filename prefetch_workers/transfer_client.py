"""The compute replica's side of its prefetch worker: a `TransferExecutor` whose copies run
in the worker process. Submitting is a one-way Ray call; progress is read from the device
arena's header (the worker writes the last finished seq there), so polling costs no RPC."""

from __future__ import annotations

import time

import torch
from ray.actor import ActorHandle

from alignedserve.engine.kv_transfer import TransferStats
from alignedserve.prefetch_workers.worker import HEADER_DONE_SEQ
from alignedserve.scheduling.interface import KVTransfer

_SPIN_S = 0.0002  # sleep between header reads while a step waits on its fence


class PrefetchTransferQueue:
    def __init__(self, worker: ActorHandle, header: torch.Tensor, block_bytes: int) -> None:
        self.worker = worker  # Ray handle of the paired PrefetchWorker
        self.header = header  # int64 view over the device arena's header
        self.block_bytes = block_bytes
        self.stats = TransferStats()
        self.submitted = 0  # highest seq handed to the worker
        self.hits = 0  # fences already met when a step needed them (prefetch in time)
        self.misses = 0  # fences the step had to wait for

    def submit(self, transfers: tuple[KVTransfer, ...]) -> None:
        if not transfers:
            return
        self.worker.submit_transfers.remote(transfers)
        self.submitted = transfers[-1].seq
        self.stats.transfers += len(transfers)
        self.stats.bytes += sum(len(t.host_blocks) for t in transfers) * self.block_bytes

    def poll(self) -> int:
        return int(self.header[HEADER_DONE_SEQ])

    def wait(self, seq: int) -> float:
        if seq <= 0:
            return 0.0
        if self.poll() >= seq:
            self.hits += 1
            return 0.0
        self.misses += 1
        t0 = time.perf_counter()
        while self.poll() < seq:
            time.sleep(_SPIN_S)
        stalled = time.perf_counter() - t0
        self.stats.stall_s += stalled
        return stalled

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    def close(self) -> None:
        pass
