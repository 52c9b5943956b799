"""How requests reach the simulated pairs, and the cluster-level `simulate`.

`round-robin`: shards in arrival order; pairs never interact, so they are simulated one
after another or in worker processes (`iter_pairs`). `dispatch`: the deployed global
dispatch (`scheduling/dispatch.py`), the policy the scheduler leader runs.

All pairs advance in one event loop: the pair furthest behind in simulated time steps
next; before each step, requests that have arrived by then join the global queue and
`plan_dispatch` assigns queued requests to pairs with room (`inflight_per_pair` minus what
a pair holds), aligned by KV length, with the starvation bound on arrival-time clocks.
Simplification: the real cluster indexes a request after a prefetch worker prefilled it
(KV length = prompt + 1); here it is indexed at arrival by its prompt length, and the pair
it goes to prefills it. Pairs interact through the queue, so this runs in one process.

Nodes (`pairs_per_node`, `sim/nodes.py`). Modelled: request k is prefilled by the prefetch
worker of pair `prefill_pair[k]` (default k mod pairs: workers claiming the FCFS prefill
queue in turn), so its KV, and its `Queued.node`, is that pair's node; every `Room.node` is
its pair's node, and `plan_dispatch` prefers local requests. A request assigned to a pair
on another node holds a place there at once, but joins that pair's scheduler only when its
KV (prompt x the model's KV bytes per token) has crossed the network; pulls queue on both
nodes' NICs and overlap every pair's steps. Its TTFT counts the wait; `PairResult.pull_s`
and `pull_bytes` record it. Not modelled: prefill still runs on the decoding pair, after
the pull (as above: a pull starts at dispatch, not after a prefill on the source node); the
source workers' prefill queue and their host stores' capacity; per-pull latency, switch
contention, and the PCIe hop from the destination node's host store into the pair.
Round-robin routing has no pulls: a pair prefills what it decodes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from functools import partial

import numpy as np

from alignedserve.scheduling.dispatch import DispatchKnobs, Queued, Room, plan_dispatch
from alignedserve.sim.cluster import PairResult, SimPair
from alignedserve.sim.config import SimConfig
from alignedserve.sim.cost_model import CostModel, hardware, model
from alignedserve.sim.nodes import InterNodeLinks
from alignedserve.sim.workload import SimWorkload


def simulate_dispatched(cfg: SimConfig, wl: SimWorkload,
                        prefill_pair: np.ndarray | None = None) -> list[PairResult]:
    """Every pair's result under the global dispatch. `prefill_pair`: [n] the pair whose
    prefetch worker prefills request k (where its KV sits); default k mod pairs."""
    return _DispatchedCluster(cfg, wl, prefill_pair).run()


class _DispatchedCluster:
    """The pairs, the inter-node links and the workload of one dispatch-routed run."""

    def __init__(self, cfg: SimConfig, wl: SimWorkload, prefill_pair: np.ndarray | None) -> None:
        n = len(wl)
        cost = CostModel(hardware(cfg.hardware), model(cfg.model), kernel=cfg.kernel)
        self.cfg, self.pairs = cfg, [SimPair(cfg, cost) for _ in range(cfg.pairs)]
        self.knobs = DispatchKnobs(cfg.max_spread, cfg.slack_tokens, cfg.max_queue_delay_s,
                                   align_by=cfg.kernel_align_by)
        nodes = cfg.nodes
        self.links = InterNodeLinks(nodes.count, cfg.internode_gbps, cost.m.kv_bytes_per_token)
        self.pair_node = [nodes.of_pair(j) for j in range(cfg.pairs)]
        src = np.arange(n) % cfg.pairs if prefill_pair is None else np.asarray(prefill_pair)
        if src.shape != (n,) or ((src < 0) | (src >= cfg.pairs)).any():
            raise ValueError(f"prefill_pair must give each of {n} requests a pair in "
                             f"[0, {cfg.pairs})")
        self.home = [self.pair_node[j] for j in src.tolist()]  # [n] node holding its KV
        self.prompt, self.output = wl.prompt.tolist(), wl.output.tolist()
        self.arrival = wl.arrival.tolist()

    def run(self) -> list[PairResult]:
        pairs, arrival = self.pairs, self.arrival
        for p in pairs:
            p.begin()
        n, i = len(arrival), 0
        queue: list[Queued] = []  # by KV length, ties in arrival order
        while True:
            busy = [p for p in pairs if p.has_work]
            nxt = arrival[i] if i < n else None
            clocks = [p.next_event for p in busy] + ([nxt] if nxt is not None else [])
            if not clocks and not queue:
                break
            t = min(clocks) if clocks else max(p.now for p in pairs)
            while i < n and arrival[i] <= t:
                queue.append(Queued(str(i), self.prompt[i], arrival[i], str(self.home[i])))
                i += 1
            if queue:
                queue = self._dispatch(queue, t)
            busy = [p for p in pairs if p.has_work]
            if busy:
                min(busy, key=lambda p: p.next_event).step(arrival[i] if i < n else None)
            elif queue and i >= n:
                raise RuntimeError("queued requests but no pair has room "
                                   "(inflight_per_pair < 1?)")
        return [p.result() for p in pairs]

    def _dispatch(self, queue: list[Queued], t: float) -> list[Queued]:
        """Assign what `plan_dispatch` picks at time `t`; returns what stays queued. A
        request leaving its KV's node starts its pull now."""
        inflight = self.cfg.inflight_per_pair
        rooms = [Room(str(j), inflight - p.num_requests, str(self.pair_node[j]))
                 for j, p in enumerate(self.pairs)]
        queue.sort(key=lambda q: (q.kv_len, int(q.request_id)))
        taken: set[str] = set()
        for replica, rids in plan_dispatch(queue, rooms, self.knobs, t):
            j = int(replica)
            pair, dst = self.pairs[j], self.pair_node[j]
            pair.now = max(pair.now, t)  # an idle pair's clock catches up
            for rid in rids:
                k = int(rid)
                src = self.home[k]
                pull = None if src == dst else self.links.pull(src, dst, self.prompt[k], t)
                pair.admit(self.prompt[k], self.output[k], self.arrival[k], pull)
                taken.add(rid)
        return [q for q in queue if q.request_id not in taken]


def run_pair(cfg: SimConfig, shard: SimWorkload) -> PairResult:
    cost = CostModel(hardware(cfg.hardware), model(cfg.model), kernel=cfg.kernel)
    return SimPair(cfg, cost).run(shard)


def iter_pairs(cfg: SimConfig, wl: SimWorkload, workers: int = 1) -> Iterator[PairResult]:
    """Each pair's result, in pair order; `workers` > 1 simulates pairs in forked
    processes (pairs are independent, so the results are the same)."""
    shards = (wl.shard(p, cfg.pairs) for p in range(cfg.pairs))
    if workers <= 1 or cfg.pairs == 1:
        for shard in shards:
            yield run_pair(cfg, shard)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(partial(run_pair, cfg), shards, chunksize=4)


def simulate(cfg: SimConfig, wl: SimWorkload, workers: int = 1,
             progress: bool = False) -> list[PairResult]:
    """Every pair's result, routed as `cfg.router` says."""
    from tqdm import tqdm

    if cfg.router == "dispatch":
        return simulate_dispatched(cfg, wl)
    bar = tqdm(total=cfg.pairs, desc=f"{cfg.policy} pairs", unit="pair",
               disable=not progress, mininterval=2.0)
    out = []
    for r in iter_pairs(cfg, wl, workers):
        out.append(r)
        bar.update()
    bar.close()
    return out
