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
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from functools import partial

from alignedserve.scheduling.dispatch import DispatchKnobs, Queued, Room, plan_dispatch
from alignedserve.sim.cluster import PairResult, SimConfig, SimPair
from alignedserve.sim.cost_model import CostModel, hardware, model
from alignedserve.sim.workload import SimWorkload


def simulate_dispatched(cfg: SimConfig, wl: SimWorkload) -> list[PairResult]:
    cost = CostModel(hardware(cfg.hardware), model(cfg.model), kernel=cfg.kernel)
    pairs = [SimPair(cfg, cost) for _ in range(cfg.pairs)]
    for p in pairs:
        p.begin()
    knobs = DispatchKnobs(cfg.max_spread, cfg.slack_tokens, cfg.max_queue_delay_s)
    prompt, output, arrival = wl.prompt.tolist(), wl.output.tolist(), wl.arrival.tolist()
    n, i = len(wl), 0
    queue: list[Queued] = []  # by KV length, ties in arrival order
    while True:
        busy = [p for p in pairs if p.scheduler.has_unfinished()]
        nxt = arrival[i] if i < n else None
        clocks = [p.now for p in busy] + ([nxt] if nxt is not None else [])
        if not clocks and not queue:
            break
        t = min(clocks) if clocks else max(p.now for p in pairs)
        while i < n and arrival[i] <= t:
            queue.append(Queued(str(i), prompt[i], arrival[i]))
            i += 1
        if queue:
            queue = _dispatch(queue, pairs, cfg.inflight_per_pair, knobs, t,
                              prompt, output, arrival)
        busy = [p for p in pairs if p.scheduler.has_unfinished()]
        if busy:
            min(busy, key=lambda p: p.now).step(arrival[i] if i < n else None)
        elif queue and i >= n:
            raise RuntimeError("queued requests but no pair has room (inflight_per_pair < 1?)")
    return [p.result() for p in pairs]


def _dispatch(queue: list[Queued], pairs: list[SimPair], inflight: int,
              knobs: DispatchKnobs, t: float, prompt: list[int], output: list[int],
              arrival: list[float]) -> list[Queued]:
    """Assign what `plan_dispatch` picks at time `t`; returns what stays queued."""
    rooms = [Room(str(j), inflight - p.num_requests) for j, p in enumerate(pairs)]
    queue.sort(key=lambda q: (q.kv_len, int(q.request_id)))
    taken: set[str] = set()
    for replica, rids in plan_dispatch(queue, rooms, knobs, t):
        pair = pairs[int(replica)]
        pair.now = max(pair.now, t)  # an idle pair's clock catches up
        for rid in rids:
            k = int(rid)
            pair.admit(prompt[k], output[k], arrival[k])
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
