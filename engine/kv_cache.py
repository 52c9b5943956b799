"""The device KV pool: one preallocated tensor of fixed-size blocks.

Layout: kv[block, layer, 0 = K | 1 = V, slot_in_block, kv_head, head_dim].
Block-major, so one block's KV for every layer is one contiguous span: moving a request
between this pool and the host pool is a copy of whole blocks. The pool is allocated and
touched once at start-up and never grown.
"""

from __future__ import annotations

import torch

from alignedserve.engine.config import ModelConfig


class PagedKVCache:
    def __init__(
        self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
        storage: torch.Tensor | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        if storage is None:
            storage = torch.zeros(shape, dtype=dtype)  # zeros: pages are touched now, not mid-step
        elif tuple(storage.shape) != shape or storage.dtype != dtype:
            raise ValueError(f"KV storage is {tuple(storage.shape)} {storage.dtype}, the model "
                             f"needs {shape} {dtype}")
        # storage: an owned tensor, or a shared-memory arena another process copies into
        # (a compute replica's pool, filled by its prefetch worker).
        self.kv = storage
        # Per-layer views [num_blocks, block_size, kv_heads, head_dim] (strided, no copies).
        self.k = [self.kv[:, i, 0] for i in range(cfg.num_layers)]
        self.v = [self.kv[:, i, 1] for i in range(cfg.num_layers)]

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, blk: torch.Tensor, off: torch.Tensor
    ) -> None:
        """Store new tokens' K/V. k, v: [T, kv_heads, head_dim]; blk, off: [T] slot coordinates."""
        self.k[layer][blk, off] = k
        self.v[layer][blk, off] = v

    def gather(
        self, layer: int, blocks: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one sequence as [kv_heads, length, head_dim] (a copy of its blocks)."""
        k = self.k[layer].index_select(0, blocks).flatten(0, 1)[:length]
        v = self.v[layer].index_select(0, blocks).flatten(0, 1)[:length]
        return k.transpose(0, 1), v.transpose(0, 1)
