"""`alignedserve sim plan`: the cheapest configuration that meets a P99 TPOT SLO at a rate.

Requests reach pairs round-robin, so with `pairs` pairs at `rate` req/s, pair 0 sees every
`pairs`-th request of the global arrival stream, and every pair sees a statistically equal
shard. The planner therefore simulates one pair on its exact shard of a global stream (a
fixed number of requests per pair) instead of the whole cluster, which makes a search of
hundreds of configurations cheap.

For each knob set, the smallest pair count that meets the SLO is found by doubling and then
bisection (P99 TPOT falls, and the chance of keeping up rises, with more pairs). Cost is
GPUs: two per aligned pair (compute + prefetch), one per fcfs replica. A configuration
"keeps up" when its pair finishes within `drain_factor` x the arrival window: a queue that
grows without bound would otherwise pass a TPOT SLO while TTFT diverges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from alignedserve.sim.config import SimConfig
from alignedserve.sim.router import run_pair
from alignedserve.sim.run import summarize
from alignedserve.sim.workload import sim_workload

# Knob sets searched: the paper's (Kmin 36, Bmax 40%) and variants, and the fcfs baseline.
KNOBS: tuple[dict[str, Any], ...] = (
    {"policy": "aligned", "min_batch": 36, "batch_kv_fraction": 0.4, "max_wait_steps": 256},
    {"policy": "aligned", "min_batch": 36, "batch_kv_fraction": 0.8, "max_wait_steps": 256},
    {"policy": "aligned", "min_batch": 8, "batch_kv_fraction": 0.8, "max_wait_steps": 64},
    {"policy": "aligned", "min_batch": 16, "batch_kv_fraction": 0.6, "max_wait_steps": 128},
    {"policy": "fcfs", "max_num_batched_tokens": 8192},
    {"policy": "fcfs", "max_num_batched_tokens": 2048},
)


@dataclass(frozen=True)
class PlanRequest:
    model: str
    workload: str
    slo_tpot_ms: float  # P99 time per output token, ms
    rate: float  # cluster-wide requests per second
    hardware: str = "h100-sxm"
    len_scale: float = 1.0
    per_pair: int = 300  # requests simulated per candidate (pair 0's shard)
    max_pairs: int = 4096
    drain_factor: float = 1.5  # keeps up: last completion <= this x last arrival
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    knobs: dict[str, Any]
    pairs: int
    gpus: int
    tpot_p99_ms: float
    ttft_p99_s: float
    decode_batch: float
    host_pool_gib: float  # peak host KV pool per pair, GiB (aligned)
    meets: bool


def evaluate(req: PlanRequest, knobs: dict[str, Any], pairs: int) -> Candidate:
    """Simulate pair 0 of a `pairs`-pair cluster at the global rate."""
    wl = sim_workload(req.workload, req.per_pair * pairs, seed=req.seed,
                      len_scale=req.len_scale, rate=req.rate)
    cfg = SimConfig(hardware=req.hardware, model=req.model, pairs=pairs).but(**knobs)
    shard = wl.shard(0, pairs)
    s = summarize([run_pair(cfg, shard)])
    keeps_up = s["makespan_s"] <= req.drain_factor * float(shard.arrival[-1]) + 1.0
    return Candidate(knobs, pairs, cfg.gpus, s["tpot_p99_ms"], s["ttft_p99_s"],
                     s["decode_batch"], s["peak_host_gib"],
                     keeps_up and s["tpot_p99_ms"] <= req.slo_tpot_ms)


def smallest_pairs(req: PlanRequest, knobs: dict[str, Any]) -> Candidate | None:
    """Doubling then bisection over pair counts; None if even max_pairs misses the SLO."""
    lo, hi, best = 0, 1, None  # lo: largest count known to miss
    while hi <= req.max_pairs:
        c = evaluate(req, knobs, hi)
        if c.meets:
            best = c
            break
        lo, hi = hi, hi * 2
    if best is None:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = evaluate(req, knobs, mid)
        if c.meets:
            hi, best = mid, c
        else:
            lo = mid
    return best


def plan(req: PlanRequest) -> tuple[Candidate | None, list[Candidate]]:
    """(cheapest meeting the SLO, every knob set's smallest meeting configuration)."""
    found = [c for k in KNOBS if (c := smallest_pairs(req, k)) is not None]
    best = min(found, key=lambda c: (c.gpus, c.tpot_p99_ms), default=None)
    return best, found


def describe(c: Candidate) -> str:
    knobs = ", ".join(f"{k}={v}" for k, v in c.knobs.items())
    host = (f", host pool >= {math.ceil(c.host_pool_gib * 1.25)} GiB per pair (peak "
            f"{c.host_pool_gib:.1f} + 25%)" if c.knobs["policy"] == "aligned" else "")
    return (f"{c.gpus} GPUs = {c.pairs} {'pairs' if c.knobs['policy'] == 'aligned' else 'replicas'}"
            f" [{knobs}]: P99 TPOT {c.tpot_p99_ms:.1f} ms, P99 TTFT {c.ttft_p99_s:.1f} s, "
            f"mean decode batch {c.decode_batch:.0f}{host}")


@dataclass(frozen=True)
class Capacity:
    """The highest Poisson rate one pair of `system` sustains within the SLO."""

    system: str
    rate: float  # requests/s per pair (0 if even the lowest rate tried misses)
    per_gpu: float  # requests/s per GPU the pair occupies
    tpot_p99_ms: float  # at `rate`
    ttft_p99_s: float


def capacity(base: SimConfig, system: str, workload: str, slo_tpot_ms: float,
             num_requests: int = 300, seed: int = 0, len_scale: float = 1.0,
             drain_factor: float = 1.5, rel_tol: float = 0.05) -> Capacity:
    """Online capacity (issue 11): doubling then bisection over the arrival rate of one
    pair (compute parity), `num_requests` Poisson arrivals per try. A rate is sustained when
    P99 TPOT <= `slo_tpot_ms` and the pair keeps up (last completion within
    `drain_factor` x the last arrival), as in the planner."""
    from alignedserve.sim.run import system_config

    cfg = system_config(base, system, 1, parity="compute")

    def run(rate: float) -> tuple[bool, dict[str, Any]]:
        wl = sim_workload(workload, num_requests, seed=seed, len_scale=len_scale, rate=rate)
        s = summarize([run_pair(cfg, wl)])
        keeps_up = s["makespan_s"] <= drain_factor * float(wl.arrival[-1]) + 1.0
        return keeps_up and s["tpot_p99_ms"] <= slo_tpot_ms, s

    lo, hi, best = 0.0, 0.25, None
    while True:  # double until a rate misses (or the SLO is met even offline-like)
        ok, s = run(hi)
        if not ok:
            break
        lo, best = hi, s
        hi *= 2
        if hi > 1e4:
            break
    while hi - lo > rel_tol * max(lo, 1e-9) and lo > 0:
        mid = (lo + hi) / 2
        ok, s = run(mid)
        if ok:
            lo, best = mid, s
        else:
            hi = mid
    if best is None:
        return Capacity(system, 0.0, 0.0, float("nan"), float("nan"))
    return Capacity(system, lo, lo / cfg.gpus, best["tpot_p99_ms"], best["ttft_p99_s"])
