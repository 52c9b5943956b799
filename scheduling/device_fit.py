"""What a request costs on the device, for the aligned policy.

A request's *cost* is the device blocks it needs now plus its growth over the next
`lookahead_tokens` steps. The running batch keeps back its *peak* growth over that horizon
(members that finish free their blocks for the others), and what is left after the
watermark is the *room* new members may take.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from alignedserve.scheduling.aligned_config import AlignedConfig
from alignedserve.scheduling.block_manager import KVBlockManager, blocks_for, peak_growth
from alignedserve.scheduling.request import Request


class DeviceFit:
    """Room arithmetic over one device's block pool."""

    def __init__(self, device: KVBlockManager, cfg: AlignedConfig) -> None:
        self.device = device
        self.cfg = cfg

    def cost(self, req: Request) -> int:
        """Device blocks the request needs now plus its lookahead growth."""
        grow = min(self.cfg.lookahead_tokens, req.params.max_tokens - req.num_output_tokens)
        return blocks_for(req.num_tokens + max(0, grow), self.device.block_size)

    def to_take(self, req: Request) -> int:
        """Free device blocks a pooled request takes to join (a staged one holds some)."""
        return self.cost(req) - len(req.block_ids)

    def room(self, running: Sequence[Request]) -> int:
        """Device blocks a new member may take: free blocks less the watermark and the
        running batch's peak growth over the next `lookahead_tokens` steps."""
        return (self.device.num_free_blocks - self.device.watermark_blocks
                - self.peak_growth(running))

    def peak_growth(self, running: Sequence[Request]) -> int:
        """`peak_growth` of the running members. A member's steps left come from max_tokens
        (an upper bound; exact under ignore_eos) plus its prefill steps."""
        chunk = self.cfg.max_num_batched_tokens
        return peak_growth(
            ((min(r.params.max_tokens - (n - r.num_prompt_tokens), r.max_model_len - n)
              + -(-max(0, n - r.num_computed_tokens - 1) // chunk), n, len(r.block_ids))
             for r in running for n in (len(r.token_ids),)),  # n: num_tokens, inlined
            self.cfg.lookahead_tokens, self.device.block_size)

    def all_fit(self, pooled: Collection[Request], slots: int, room: int) -> bool:
        """Every pooled request fits `slots` and `room` blocks (stops at the first overflow)."""
        if len(pooled) > slots:
            return False
        need = 0
        for r in pooled:
            need += self.to_take(r)
            if need > room:
                return False
        return True
