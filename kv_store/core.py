"""The host KV store itself (pure Python + torch, testable without Ray): an allocator over a
shared-memory arena's slots and an index (request id -> slots in block-index order).

When the arena is full, `allocate` returns None and changes nothing; callers wait
(`store.allocate_wait`), so admission blocks rather than dropping anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignedserve.kv_store.shm_arena import ArenaSpec, ShmArena, remove_orphans
from alignedserve.scheduling.block_manager import BlockAllocator


@dataclass(frozen=True)
class KVStoreStats:
    num_blocks: int
    used_blocks: int
    num_requests: int  # request ids holding blocks
    allocations: int  # successful allocate calls that added blocks
    frees: int  # free calls that released blocks
    failed_allocations: int  # allocate calls refused because the arena was full
    bytes_read: int  # through read() / the gRPC service
    bytes_written: int

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks


class KVStoreCore:
    """Invariant: every slot is free or belongs to exactly one request id."""

    def __init__(self, spec_name: str, num_blocks: int, block_shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        remove_orphans()  # a store killed before (kill -9) left its arena behind
        self.arena = ShmArena.create(spec_name, num_blocks, block_shape, dtype)
        self.allocator = BlockAllocator(num_blocks)
        self.slots: dict[str, list[int]] = {}
        self._counts = {"allocations": 0, "frees": 0, "failed_allocations": 0,
                        "bytes_read": 0, "bytes_written": 0}

    def spec(self) -> ArenaSpec:
        return self.arena.spec

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        """Grow `request_id`'s blocks to `num_blocks` in all; its slot ids, or None (no
        change) when the arena is short."""
        held = self.slots.get(request_id, [])
        if num_blocks <= len(held):
            return list(held)
        grown = list(held)
        if not self.allocator.extend_to(grown, num_blocks):
            self._counts["failed_allocations"] += 1
            return None
        self.slots[request_id] = grown
        self._counts["allocations"] += 1
        return list(grown)

    def free(self, request_id: str) -> int:
        held = self.slots.pop(request_id, None)
        if not held:
            return 0
        self.allocator.free(held)
        self._counts["frees"] += 1
        return len(held)

    def blocks(self, request_id: str) -> list[int]:
        return list(self.slots.get(request_id, ()))

    def _slots_of(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        held = self.slots.get(request_id)
        if held is None:
            raise KeyError(f"request {request_id!r} holds no blocks")
        if any(not 0 <= i < len(held) for i in block_indices):
            raise IndexError(f"{request_id!r} holds {len(held)} blocks, asked {block_indices}")
        return torch.tensor([held[i] for i in block_indices], dtype=torch.long)

    def read(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        """[k, *block_shape]: a copy of the request's blocks `block_indices`."""
        out = self.arena.blocks.index_select(0, self._slots_of(request_id, block_indices))
        self._counts["bytes_read"] += out.numel() * out.element_size()
        return out

    def write(self, request_id: str, block_indices: list[int], data: torch.Tensor) -> None:
        slots = self._slots_of(request_id, block_indices)
        self.arena.blocks.index_copy_(0, slots, data.to(self.arena.blocks.dtype))
        self._counts["bytes_written"] += data.numel() * data.element_size()

    def stats(self) -> KVStoreStats:
        n = self.allocator.num_blocks
        return KVStoreStats(n, n - self.allocator.num_free, len(self.slots), **self._counts)

    def close(self) -> None:
        self.arena.close()
        self.arena.unlink()
