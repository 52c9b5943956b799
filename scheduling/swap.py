"""Moving requests' KV between the device pool and the host pool, as block-id bookkeeping.

The swapper decides which blocks move and emits `KVTransfer` messages; the executor (engine,
compute replica, simulator) performs them in the background in `seq` order and reports
progress with `transfers_done(seq)`. Two hazards follow from the copies being asynchronous,
and both are handled here rather than by the executor:
- device blocks a pending swap-out still reads, or a pending swap-in still writes, go back
  to the device free list only once that transfer is done;
- a request may compute only after its swap-in is done: `Request.kv_ready_seq` names the
  transfer, and the scheduler puts it in `SchedulerOutput.fence`.
Host blocks can be reused at once: transfers run in order, so a later write to a reused host
block lands after every earlier read of it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

from alignedserve.scheduling.block_manager import KVBlockManager, blocks_for
from alignedserve.scheduling.interface import KVTransfer
from alignedserve.scheduling.request import Request


class HostAllocator(Protocol):
    """Host pool capacity, owned by one allocator. In-process it is a `BlockAllocator`; in
    the cluster it is the node's KV store, which knows blocks by (request id, index)."""

    num_blocks: int

    @property
    def num_free(self) -> int: ...

    def reserve(self, owner: str, held: list[int], total: int) -> bool:
        """Grow `held` (owner's block ids, in position order) in place to `total` blocks;
        False and no change when the pool is short."""
        ...

    def reserve_ahead(self, owner: str, held: list[int], total: int) -> bool:
        """As `reserve`, for capacity held ahead of need (admission): the ids in `held` may
        arrive later, and an allocator that answers asynchronously may grant it on a hint."""
        ...

    def release(self, owner: str, held: list[int]) -> None:
        """Free every block in `held`."""
        ...


@dataclass
class SwapStats:
    swap_ins: int = 0  # requests brought to the device from the host
    swap_outs: int = 0  # requests sent to the host
    blocks_in: int = 0  # blocks copied host -> device
    blocks_out: int = 0  # blocks copied device -> host (only blocks the host lacked)


class KVSwapper:
    """Device/host block moves for one device. Host block ids come from `host`, the host
    pool's own allocator, so capacity accounting has a single owner."""

    def __init__(self, device: KVBlockManager, host: HostAllocator) -> None:
        self.device = device
        self.host = host
        self.block_size = device.block_size
        self.done_seq = 0  # every transfer with seq <= done_seq has finished
        self.stats = SwapStats()
        self._seq = 0
        self._outbox: list[KVTransfer] = []
        self._deferred_free: deque[tuple[int, list[int]]] = deque()  # (seq, device blocks)

    @property
    def pending(self) -> bool:
        """Some transfer issued is not finished yet."""
        return self._seq > self.done_seq

    def host_blocks_free(self) -> int:
        return self.host.num_free

    def reserve_host(self, req: Request, num_tokens: int) -> bool:
        """Hold host blocks for `num_tokens` of `req`'s KV; False (no change) when short."""
        total = blocks_for(num_tokens, self.block_size)
        return self.host.reserve(req.request_id, req.host_block_ids, total)

    def hold_host(self, req: Request, num_tokens: int) -> bool:
        """Admission: hold host room for `num_tokens` of `req`'s KV ahead of any swap-out
        (`HostAllocator.reserve_ahead`); False when short."""
        total = blocks_for(num_tokens, self.block_size)
        return self.host.reserve_ahead(req.request_id, req.host_block_ids, total)

    def swap_out(self, req: Request) -> bool:
        """Write the blocks the host lacks, then drop `req`'s device blocks.

        Only blocks from the one holding token `num_host_tokens` on are copied: earlier ones
        are unchanged since the last swap-out. False (nothing changes) when the host pool
        cannot hold the request's KV; the caller then drops the KV and recomputes it.
        """
        n = req.num_computed_tokens
        if not self.reserve_host(req, n):
            return False
        first, last = req.num_host_tokens // self.block_size, blocks_for(n, self.block_size)
        held, req.block_ids = req.block_ids, []
        if last > first:
            t = self._issue(req, "swap_out", req.host_block_ids[first:last], held[first:last])
            self.stats.swap_outs += 1
            self.stats.blocks_out += last - first
            self._free_device_after(t.seq, held)
        else:
            self._free_device_after(req.kv_ready_seq, held)
        req.num_host_tokens = n
        return True

    def swap_in(self, req: Request) -> bool:
        """Give `req` device blocks for its computed tokens and copy them from the host.
        False (no change) when the device pool is short. No-op for a request with no KV or
        one that already holds device blocks (staged by the candidate-requests buffer)."""
        n = req.num_computed_tokens
        if n == 0 or req.block_ids:
            return True  # nothing to copy, or already on the device (or on its way)
        if n > req.num_host_tokens:
            raise RuntimeError(f"{req.request_id}: host holds {req.num_host_tokens} of {n} tokens")
        if not self.device.try_grow(req, 0):
            return False
        k = blocks_for(n, self.block_size)
        t = self._issue(req, "swap_in", req.host_block_ids[:k], req.block_ids[:k])
        req.kv_ready_seq = t.seq
        self.stats.swap_ins += 1
        self.stats.blocks_in += k
        return True

    def drop_device(self, req: Request) -> None:
        """Free `req`'s device blocks (finished, aborted or recomputed)."""
        held, req.block_ids = req.block_ids, []
        self._free_device_after(req.kv_ready_seq, held)

    def release(self, req: Request) -> None:
        """Free everything `req` holds, device and host."""
        self.drop_device(req)
        if req.host_block_ids:
            self.host.release(req.request_id, req.host_block_ids)
            req.host_block_ids = []
        req.num_host_tokens = 0

    def drain(self) -> tuple[KVTransfer, ...]:
        """Transfers issued since the last call, in seq order, for the executor to start."""
        out, self._outbox = tuple(self._outbox), []
        return out

    def transfers_done(self, seq: int) -> None:
        self.done_seq = max(self.done_seq, seq)
        while self._deferred_free and self._deferred_free[0][0] <= self.done_seq:
            self.device.allocator.free(self._deferred_free.popleft()[1])

    def _issue(self, req: Request, kind: Literal["swap_in", "swap_out"], host: list[int],
               device: list[int]) -> KVTransfer:
        self._seq += 1
        t = KVTransfer(self._seq, req.request_id, kind, tuple(host), tuple(device))
        self._outbox.append(t)
        return t

    def _free_device_after(self, seq: int, blocks: list[int]) -> None:
        if not blocks:
            return
        if seq <= self.done_seq:
            self.device.allocator.free(blocks)
        else:
            self._deferred_free.append((seq, blocks))
