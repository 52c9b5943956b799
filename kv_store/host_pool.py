"""The host KV pool: a large block arena in host memory, separate from the device pool.

Blocks have the device pool's block layout ([layer, K|V, slot, kv_head, dim] each), so a
transfer is a copy of whole blocks. Block ids are handed out by the same pure-Python
allocator the scheduler uses for the device pool. This in-process implementation is the
one the `kv_store` Ray actor (shared memory + gRPC, serving issue) will implement too.

On CUDA the arena would be pinned (`pin_memory=True`) so copies to the device can be
asynchronous; that path is not exercised in CI (no GPU here).
"""

from __future__ import annotations

import torch

from alignedserve.scheduling.block_manager import BlockAllocator


class HostKVPool:
    """Fixed-capacity arena of KV blocks.

    Invariant: a block id is either free or owned by exactly one request; reads and
    writes name blocks explicitly, so the pool never interprets their contents.
    """

    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 pin_memory: bool = False) -> None:
        # block_shape: [layers, 2, block_size, kv_heads, head_dim] (the device block layout)
        self.block_shape = tuple(block_shape)
        self.data = torch.zeros((num_blocks, *block_shape), dtype=dtype, pin_memory=pin_memory)
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks, or None (taking nothing) when the pool is full: callers wait."""
        return self.allocator.allocate(n)

    def free(self, ids: list[int]) -> None:
        self.allocator.free(ids)

    def write_from(self, ids: list[int], src: torch.Tensor, src_ids: list[int]) -> None:
        """Copy blocks `src_ids` of `src` ([blocks, *block_shape]) into host blocks `ids`."""
        if len(ids) != len(src_ids):
            raise ValueError(f"{len(ids)} host blocks for {len(src_ids)} source blocks")
        if ids:
            index = torch.tensor(src_ids, dtype=torch.long, device=src.device)
            self.data[torch.tensor(ids, dtype=torch.long)] = src.index_select(0, index).cpu()

    def read_into(self, ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
        """Copy host blocks `ids` into blocks `dst_ids` of `dst` ([blocks, *block_shape])."""
        if len(ids) != len(dst_ids):
            raise ValueError(f"{len(ids)} host blocks for {len(dst_ids)} destination blocks")
        if ids:
            blocks = self.data.index_select(0, torch.tensor(ids, dtype=torch.long))
            dst[torch.tensor(dst_ids, dtype=torch.long, device=dst.device)] = blocks.to(
                dst.device, non_blocking=True)
