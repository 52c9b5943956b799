"""Pool sizes of one engine configuration: the one place they are computed (the engine, the
compute replica, the router and the KV store all agree through it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignedserve.engine.config import EngineConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PoolSizes:
    block_shape: tuple[int, ...]  # one KV block: [layers, K|V, block_size, kv_heads, head_dim]
    dtype: torch.dtype  # of weights, activations and KV
    block_bytes: int  # bytes of one KV block
    device_blocks: int  # the device KV pool: num_kv_blocks, else kv_cache_gib worth
    host_blocks: int  # the host KV pool: host_kv_blocks, else host_kv_gib worth
    max_model_len: int  # tokens (prompt + output) a request may have on the device pool

    @property
    def max_len_with_host(self) -> int:
        """The context cap when a request's KV must also fit the host pool (aligned)."""
        block_size = self.block_shape[2]
        return min(self.max_model_len, self.host_blocks * block_size)


def pool_sizes(cfg: EngineConfig, model: ModelConfig) -> PoolSizes:
    dtype = DTYPES[cfg.dtype]
    shape = (model.num_layers, 2, cfg.block_size, model.num_kv_heads, model.head_dim)
    block_bytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    device = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_gib * 2**30 // block_bytes))
    host = cfg.host_kv_blocks or max(1, int(cfg.host_kv_gib * 2**30 // block_bytes))
    max_len = min(cfg.max_model_len or model.max_position_embeddings,
                  model.max_position_embeddings, device * cfg.block_size)
    return PoolSizes(shape, dtype, block_bytes, device, host, max_len)
