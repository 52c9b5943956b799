"""Device KV block accounting: a free-list allocator and per-request block tables.

The engine owns the actual KV tensors; this module only decides which block ids each
request holds. Block `b` of a request covers token positions [b*block_size, (b+1)*block_size).
"""

from __future__ import annotations

from collections.abc import Iterable

from alignedserve.scheduling.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


def peak_growth(members: Iterable[tuple[int, int, int]], lookahead: int,
                block_size: int) -> int:
    """Blocks a set of decoding requests will need beyond what they hold, at the worst step
    of the next `lookahead`, given each as (steps until it finishes, tokens now, blocks
    held): a request that finishes inside the window frees its blocks for the others'
    growth. Each request's blocks at step t are bounded by (tokens + t + block_size) //
    block_size, summed, so one pass over the requests sorted by their end finds the peak;
    it overshoots the exact peak by less than one block per request."""
    ends, held = [], 0
    for steps, tokens, blocks in members:
        ends.append((max(1, steps), tokens))
        held += blocks
    ends.sort()
    tokens, alive, peak = sum(n for _, n in ends), len(ends), 0
    for end, n in ends:  # at step t = end - 1 this request and every later one are alive
        t = min(end - 1, lookahead)
        peak = max(peak, (tokens + alive * (t + block_size)) // block_size)
        if end > lookahead:
            break  # every request left outlives the window: t = lookahead was the last
        tokens -= n
        alive -= 1
    return max(0, peak - held)


class BlockAllocator:
    """Free-list allocator over block ids [0, num_blocks).

    Invariant: every id is either free or owned by exactly one holder; `free` of an id
    that is already free is a bug and raises.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        # Pop from the end: lowest ids first, so a fresh pool hands out contiguous runs.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take `n` blocks, or None (and take nothing) if fewer are free."""
        if n > len(self._free):
            return None
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def extend_to(self, held: list[int], total: int, reserve: int = 0) -> bool:
        """Grow the block list `held` in place to `total` blocks, keeping `reserve` blocks
        free; False (and no change) when short."""
        need = total - len(held)
        if need <= 0:
            return True
        if need + reserve > len(self._free):
            return False
        held.extend(self.allocate(need) or ())  # cannot be None: checked above
        return True

    def reserve(self, owner: str, held: list[int], total: int) -> bool:
        """`HostAllocator.reserve`: in-process block ids need no owner to be unambiguous."""
        return self.extend_to(held, total)

    reserve_ahead = reserve  # in-process the ids are at hand: nothing to wait for

    def release(self, owner: str, held: list[int]) -> None:
        """`HostAllocator.release`."""
        self.free(held)

    def free(self, ids: list[int]) -> None:
        for i in reversed(ids):
            if self._is_free[i]:
                raise RuntimeError(f"block {i} freed twice")
            self._is_free[i] = True
            self._free.append(i)


class KVBlockManager:
    """Grows and releases requests' block tables against one BlockAllocator.

    `watermark_blocks` are kept free when admitting new requests, so that running
    requests can still grow by a token without immediately preempting each other.
    """

    def __init__(self, num_blocks: int, block_size: int, watermark: float = 0.01) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.watermark_blocks = int(watermark * num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, blocks_for(total, self.block_size) - len(req.block_ids))

    def try_grow(self, req: Request, num_new_tokens: int, *, admit: bool = False) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens; False (and no change) if short.

        `admit=True` also keeps the watermark free (used for newly admitted requests).
        """
        total = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size)  # blocks_for
        if total <= len(req.block_ids):
            return True  # most decode steps: the last block has room
        reserve = self.watermark_blocks if admit else 0
        return self.allocator.extend_to(req.block_ids, total, reserve)

    def release(self, req: Request) -> None:
        """Return all of `req`'s blocks to the pool."""
        if req.block_ids:
            self.allocator.free(req.block_ids)
            req.block_ids = []
