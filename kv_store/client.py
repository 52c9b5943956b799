"""Same-node access to the KV store: the arena is mapped into this process and blocks are
copied directly; only the (request id -> slots) lookup goes through the actor."""

from __future__ import annotations

import ray
import torch

from alignedserve.kv_store.shm_arena import ShmArena


class KVStoreClient:
    def __init__(self, store: ray.actor.ActorHandle) -> None:
        self.store = store
        self.arena = ShmArena.attach(ray.get(store.spec.remote()))

    def slots(self, request_id: str) -> list[int]:
        return ray.get(self.store.blocks.remote(request_id))

    def _index(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        held = self.slots(request_id)
        if any(not 0 <= i < len(held) for i in block_indices):
            raise IndexError(f"{request_id!r} holds {len(held)} blocks, asked {block_indices}")
        return torch.tensor([held[i] for i in block_indices], dtype=torch.long)

    def read(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        return self.arena.blocks.index_select(0, self._index(request_id, block_indices))

    def write(self, request_id: str, block_indices: list[int], data: torch.Tensor) -> None:
        self.arena.blocks.index_copy_(0, self._index(request_id, block_indices), data)

    def close(self) -> None:
        self.arena.close()
