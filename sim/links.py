"""The KV copy paths of one compute device, as timelines.

`KVTransfer`s arrive in `seq` order and the scheduler learns progress as "every transfer with
seq <= done_seq has finished". PCIe and NVLink are full duplex, so swap-ins (host -> device)
and swap-outs (device -> host) each get their own FIFO timeline:
- prefetch: host -> prefetch device over the prefetch device's PCIe, then over NVLink into
  the compute device (and the reverse for swap-outs), pipelined block by block, so a copy
  takes the slower hop plus both latencies;
- no prefetch (the ablation): the compute device's own PCIe, each direction.
A swap-in of a request starts no earlier than that request's last swap-out has landed (what
the single FIFO of the engine guarantees). Host blocks freed by a finished request are not
read by a pending swap-in, so cross-direction reuse needs no further ordering here.
"""

from __future__ import annotations

from collections import deque

from alignedserve.scheduling.interface import KVTransfer
from alignedserve.sim.cost_model import CostModel


class CopyLinks:
    """Timelines of one device's copies. All times in simulated seconds."""

    def __init__(self, cost: CostModel, prefetch: bool, block_bytes: int) -> None:
        self.cost, self.prefetch, self.block_bytes = cost, prefetch, block_bytes
        self._free = {"swap_in": 0.0, "swap_out": 0.0}  # each direction busy until then
        self._pending: deque[tuple[int, float]] = deque()  # (seq, done time), seq order
        self._out_done: dict[str, float] = {}  # request id -> its last swap-out lands then
        self.done_seq = 0
        self.copies = 0  # transfers started
        self.busy_s = 0.0  # summed copy time over both directions

    def copy_time(self, nbytes: int) -> float:
        if self.prefetch:
            hop = max(nbytes / (self.cost.hw.pcie_gbps * 1e9 * self.cost.hw.pcie_eff),
                      nbytes / (self.cost.hw.nvlink_gbps * 1e9 * self.cost.hw.nvlink_eff))
            return hop + (self.cost.hw.pcie_latency_us + self.cost.hw.nvlink_latency_us) * 1e-6
        return self.cost.pcie(nbytes)

    def start(self, transfers: tuple[KVTransfer, ...], now: float) -> None:
        for t in transfers:
            begin = max(now, self._free[t.kind])
            if t.kind == "swap_in":
                begin = max(begin, self._out_done.pop(t.request_id, 0.0))
            dt = self.copy_time(len(t.host_blocks) * self.block_bytes)
            done = begin + dt
            self._free[t.kind] = done
            if t.kind == "swap_out":
                self._out_done[t.request_id] = done
            self._pending.append((t.seq, done))
            self.copies += 1
            self.busy_s += dt

    def advance(self, now: float) -> int:
        """done_seq as of `now`: the longest prefix of issued transfers that has landed."""
        pending = self._pending
        while pending and pending[0][1] <= now:
            self.done_seq = pending.popleft()[0]
        return self.done_seq

    def done_time(self, seq: int) -> float:
        """When every transfer with seq <= `seq` will have landed."""
        done = 0.0
        for s, t in self._pending:
            if s > seq:
                break
            done = max(done, t)
        return done

    def next_landing(self) -> float | None:
        """When done_seq next advances (the oldest pending transfer lands), if ever."""
        return self._pending[0][1] if self._pending else None
