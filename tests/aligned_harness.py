"""A fake executor for the aligned policy that models KV contents block by block.

It stores, for every device and host block slot, which (request, position, token) it holds.
Before a chunk computes it checks that the request's device blocks hold exactly its earlier
tokens, so any swap that loses, misplaces or races a block fails the test that runs it.
Transfers run a configurable number of steps late, as a background copy would.
"""

from __future__ import annotations

from collections import deque

from alignedserve.scheduling.aligned import AlignedScheduler
from alignedserve.scheduling.interface import SchedulerOutput
from alignedserve.scheduling.request import Request

BS = 4


class FakeExecutor:
    """Runs SchedulerOutputs against a block-content model of both pools."""

    def __init__(self, sched: AlignedScheduler, lag_steps: int = 1) -> None:
        self.s = sched
        self.device: dict[tuple[int, int], tuple] = {}  # (block, slot) -> (rid, pos, token)
        self.host: dict[tuple[int, int], tuple] = {}
        self.queue: deque[tuple[int, object]] = deque()  # (step issued, KVTransfer)
        self.lag = lag_steps
        self.step_no = 0
        self.outs: list[SchedulerOutput] = []

    @staticmethod
    def token(rid: str, pos: int) -> int:
        return 100 + (hash((rid, pos)) % 1000)

    def _run_transfer(self, t) -> None:
        src, dst = (self.host, self.device) if t.kind == "swap_in" else (self.device, self.host)
        src_ids, dst_ids = ((t.host_blocks, t.device_blocks) if t.kind == "swap_in"
                            else (t.device_blocks, t.host_blocks))
        for a, b in zip(src_ids, dst_ids, strict=True):
            for slot in range(BS):
                if (a, slot) in src:
                    dst[(b, slot)] = src[(a, slot)]
                else:
                    dst.pop((b, slot), None)

    def _complete(self, upto: int | None) -> None:
        while self.queue and ((upto is None and self.queue[0][0] + self.lag <= self.step_no)
                              or (upto is not None and self.queue[0][1].seq <= upto)):
            _, t = self.queue.popleft()
            self._run_transfer(t)
            self.s.transfers_done(t.seq)

    def step(self) -> list[Request]:
        out = self.s.schedule()
        self.outs.append(out)
        for t in out.transfers:
            self.queue.append((self.step_no, t))
        self._complete(out.fence)  # the fence: wait for what this step needs
        sampled = {}
        for c in out.chunks:
            req = c.request
            for pos in range(c.start):  # earlier KV must be in place, exactly
                b, slot = req.block_ids[pos // BS], pos % BS
                assert self.device.get((b, slot)) == (req.request_id, pos, req.token_ids[pos]), (
                    f"{req.request_id} pos {pos}: device block {b} holds "
                    f"{self.device.get((b, slot))}")
            for pos in range(c.start, c.end):
                b = req.block_ids[pos // BS]
                self.device[(b, pos % BS)] = (req.request_id, pos, req.token_ids[pos])
            if c.samples:
                sampled[req.request_id] = self.token(req.request_id, c.end)
        done = self.s.update(out, sampled)
        self.step_no += 1
        self._complete(None)
        return done

    def run(self, max_steps: int = 5000) -> dict[str, list[int]]:
        outputs = {}
        for _ in range(max_steps):
            if not self.s.has_unfinished():
                break
            for r in self.step():
                outputs[r.request_id] = r.output_token_ids
        assert not self.s.has_unfinished(), "scheduler stalled"
        self._complete(1 << 60)
        return outputs


def expected(req: Request) -> list[int]:
    return [FakeExecutor.token(req.request_id, req.num_prompt_tokens + i)
            for i in range(req.params.max_tokens)]
