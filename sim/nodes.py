"""Multi-node locality of the dispatch-routed cluster: which node holds a request's KV, and
the inter-node network that carries it to a pair on another node.

Topology: pair j runs on node j // pairs_per_node (one node when pairs_per_node is None).
A request's KV is written by the prefetch worker that prefilled it into its own node's host
KV store; a pair on another node can only start it after pulling that KV over the network.

Network: every node has one full-duplex NIC of `gbps` GB/s each way. A pull occupies the
source node's outbound and the destination node's inbound direction for nbytes / bandwidth;
pulls through a busy direction wait for it (FIFO in dispatch order, one flow at a time).
There is no per-pull latency and no switch contention beyond the two NICs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Nodes:
    """Which node each pair runs on."""

    pairs: int  # pairs in the cluster
    pairs_per_node: int | None  # None: every pair on one node

    @property
    def count(self) -> int:
        if self.pairs_per_node is None:
            return 1
        return -(-self.pairs // self.pairs_per_node)  # the last node may hold fewer pairs

    def of_pair(self, pair: int) -> int:
        return 0 if self.pairs_per_node is None else pair // self.pairs_per_node


@dataclass(frozen=True)
class Pull:
    """One request's KV crossing from the node that prefilled it to the pair decoding it."""

    issued: float  # simulated s: the dispatch assigned it (its KV was ready to send)
    landed: float  # simulated s: the last byte reached the destination node
    nbytes: int  # KV bytes moved (kv_len x the model's KV bytes per token)

    @property
    def wait_s(self) -> float:
        """What the pull adds before the request may join a batch, link queueing included
        (an upper bound on its TTFT cost: a local request also waits for the pair's
        current step)."""
        return self.landed - self.issued


class InterNodeLinks:
    """Every node's NIC as two FIFO timelines (out, in). Times in simulated seconds."""

    def __init__(self, nodes: int, gbps: float, kv_bytes_per_token: int) -> None:
        if nodes < 1 or gbps <= 0:
            raise ValueError(f"need nodes >= 1 and gbps > 0, got {nodes} and {gbps}")
        self.bytes_per_s = gbps * 1e9
        self.kv_bytes_per_token = kv_bytes_per_token
        self._out_free = [0.0] * nodes  # node -> its outbound direction is busy until then
        self._in_free = [0.0] * nodes  # node -> its inbound direction is busy until then

    def pull(self, src: int, dst: int, kv_len: int, now: float) -> Pull:
        """Move `kv_len` tokens of KV from node `src` to node `dst` (src != dst), asked at
        `now`."""
        if src == dst:
            raise ValueError(f"a pull needs two different nodes, got {src} twice")
        nbytes = kv_len * self.kv_bytes_per_token
        begin = max(now, self._out_free[src], self._in_free[dst])
        landed = begin + nbytes / self.bytes_per_s
        self._out_free[src] = self._in_free[dst] = landed
        return Pull(now, landed, nbytes)
