"""`alignedserve sim run`: one workload through simulated policies on a simulated cluster.

Two ways to count devices (`parity`):
- `gpus` (system parity): `gpus` devices per system. `fcfs` runs them as `gpus` independent
  replicas (the vLLM baseline); `aligned` as `gpus / 2` compute + prefetch pairs, the
  prefetch device running prefill and carrying KV (GPU-Prefetch-For-GPU);
  `aligned-noprefetch` (the paper's ablation) as `gpus` compute devices, KV over each one's
  PCIe.
- `compute` (decode-device parity): every system gets `gpus` compute devices; `aligned` adds
  a prefetch device to each, so it occupies twice the GPUs.
`fcfs-disagg` and `ceiling` pair each decode device with a prefill device, counted like
`aligned`'s pairs; `fcfs-sorted` is colocated like `fcfs`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from alignedserve.sim.cluster import PairResult
from alignedserve.sim.config import SimConfig
from alignedserve.sim.router import simulate
from alignedserve.sim.workload import SimWorkload, sim_workload

SYSTEMS = ("aligned", "fcfs", "aligned-noprefetch")
# Every baseline a report shows beside aligned (issue 11): colocated fcfs (vLLM-like), fcfs
# with prefill on separate devices (DistServe-like), fcfs over a length-sorted queue (an
# oracle of cheap alignment), and the ceiling: fcfs-disagg with no decode straggler at all.
BASELINES = ("fcfs", "fcfs-disagg", "fcfs-sorted", "ceiling")
ALL_SYSTEMS = ("aligned", *BASELINES, "aligned-noprefetch")


def system_config(base: SimConfig, system: str, gpus: int, parity: str = "gpus") -> SimConfig:
    if parity not in ("gpus", "compute"):
        raise ValueError(f"parity must be gpus or compute, got {parity!r}")
    # Systems with a second device per decode device: `gpus` pairs at compute parity,
    # half as many at GPU parity.
    pairs = gpus if parity == "compute" else max(1, gpus // 2)
    if system == "aligned":
        return base.but(policy="aligned", prefetch=True, pairs=pairs)
    if system == "aligned-noprefetch":
        return base.but(policy="aligned", prefetch=False, pairs=gpus)
    if system in ("fcfs", "fcfs-sorted"):
        return base.but(policy=system, prefetch=False, pairs=gpus)
    if system in ("fcfs-disagg", "ceiling"):
        cfg = base.but(policy="fcfs", prefetch=False, disagg=True, pairs=pairs)
        return cfg.but(kernel="none") if system == "ceiling" else cfg
    raise ValueError(f"unknown system {system!r}; expected one of {ALL_SYSTEMS}")


def _pct(a: np.ndarray, q: float) -> float:
    a = a[~np.isnan(a)]
    return float(np.percentile(a, q)) if len(a) else float("nan")


def summarize(results: list[PairResult]) -> dict[str, Any]:
    """Cluster-level metrics from per-pair results (simulated seconds)."""
    end = max(r.end_s for r in results)
    ttft = np.concatenate([r.ttft_s for r in results])
    tpot = np.concatenate([r.tpot_s for r in results])
    steps = np.concatenate([r.step_s for r in results])
    gen = sum(int(r.output.sum()) for r in results)
    nsteps = sum(r.steps for r in results)
    pull = np.concatenate([r.pull_s for r in results])
    pull = pull[~np.isnan(pull)]  # the requests whose KV came from another node
    counters: dict[str, int] = {}  # the policy's and the swapper's counters, all pairs
    for r in results:
        for k, v in r.stats.items():
            counters[k] = counters.get(k, 0) + v
    return {
        "completed": int(np.sum(~np.isnan(ttft))), "makespan_s": end,
        "decode_tps": gen / end if end else 0.0,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_ms": _pct(tpot, 50) * 1e3, "tpot_p99_ms": _pct(tpot, 99) * 1e3,
        "step_p50_ms": _pct(steps, 50) * 1e3, "step_p99_ms": _pct(steps, 99) * 1e3,
        "steps": nsteps, "events": sum(r.events for r in results),
        "decode_batch": sum(r.decode_seqs for r in results) / max(1, nsteps),
        "switch_rate": sum(r.switches for r in results) / max(1, nsteps),
        "stall_s": sum(r.stall_s for r in results),
        "straggler_s": sum(r.straggler_s for r in results),
        "busy_frac": sum(r.busy_s for r in results) / max(1e-12, sum(r.end_s for r in results)),
        "peak_host_gib": max(r.peak_host_blocks * r.block_bytes for r in results) / 2**30,
        "cross_node": len(pull), "cross_node_frac": len(pull) / max(1, len(ttft)),
        "cross_node_gb": sum(r.pull_bytes for r in results) / 1e9,
        "pull_sum_s": float(pull.sum()),
        "pull_mean_ms": float(pull.mean()) * 1e3 if len(pull) else 0.0,
        "counters": counters,
    }


def run_systems(base: SimConfig, wl: SimWorkload, gpus: int,
                systems: tuple[str, ...] = SYSTEMS, parity: str = "gpus", workers: int = 1,
                progress: bool = False) -> dict[str, dict[str, Any]]:
    out = {}
    for system in systems:
        cfg = system_config(base, system, gpus, parity)
        t0 = time.perf_counter()
        results = simulate(cfg, wl, workers=workers, progress=progress)
        out[system] = summarize(results) | {"sim_wall_s": time.perf_counter() - t0,
                                            "gpus": cfg.gpus, "pairs": cfg.pairs,
                                            "nodes": cfg.nodes.count}
        out[system]["tps_per_gpu"] = out[system]["decode_tps"] / cfg.gpus
    return out


def run_sim(base: SimConfig, workload_name: str, num_requests: int, gpus: int,
            systems: tuple[str, ...] = SYSTEMS, seed: int = 0, len_scale: float = 1.0,
            rate: float | None = None, parity: str = "gpus", workers: int = 1,
            progress: bool = False) -> dict[str, dict[str, Any]]:
    wl = sim_workload(workload_name, num_requests, seed=seed, len_scale=len_scale, rate=rate)
    return run_systems(base, wl, gpus, systems, parity, workers, progress)


def print_table(summaries: dict[str, dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ("system", "GPUs", "decode tok/s", "vs fcfs", "of ceiling", "tok/s/GPU",
            "TTFT p50/p99 s",
            "TPOT p50/p99 ms", "P99 TPOT fcfs/x", "step p50/p99 ms", "batch", "switch %",
            "copy stall s", "straggler s", "sim wall s")
    for c in cols:
        table.add_column(c, justify="left" if c == "system" else "right")
    base = summaries.get("fcfs", {})
    ceiling = summaries.get("ceiling", {}).get("decode_tps")
    for name, s in summaries.items():
        tps, tpot = base.get("decode_tps"), base.get("tpot_p99_ms")
        table.add_row(
            name, str(s["gpus"]), f"{s['decode_tps']:.0f}",
            f"{s['decode_tps'] / tps:.2f}x" if tps else "-",
            f"{s['decode_tps'] / ceiling:.2f}x" if ceiling else "-", f"{s['tps_per_gpu']:.0f}",
            f"{s['ttft_p50_s']:.1f}/{s['ttft_p99_s']:.1f}",
            f"{s['tpot_p50_ms']:.1f}/{s['tpot_p99_ms']:.1f}",
            f"{tpot / s['tpot_p99_ms']:.2f}x" if tpot else "-",
            f"{s['step_p50_ms']:.1f}/{s['step_p99_ms']:.1f}", f"{s['decode_batch']:.1f}",
            f"{100 * s['switch_rate']:.1f}", f"{s['stall_s']:.1f}", f"{s['straggler_s']:.1f}",
            f"{s['sim_wall_s']:.1f}")
    Console(width=200).print(table)
    for name, s in summaries.items():
        if s.get("nodes", 1) > 1:
            print(f"{name}: {s['pairs']} pairs on {s['nodes']} nodes; {s['cross_node']} "
                  f"requests ({s['cross_node_frac']:.1%}) pulled their KV from another node, "
                  f"{s['cross_node_gb']:.1f} GB, mean pull {s['pull_mean_ms']:.1f} ms "
                  f"(summed {s['pull_sum_s']:.1f} s)")
    closed = gap_closed(summaries)
    if closed is not None:
        print(f"aligned closes {closed:.0%} of the way from fcfs-disagg to the ceiling "
              "(decode tok/s)")


def gap_closed(summaries: dict[str, dict[str, Any]]) -> float | None:
    """(aligned - fcfs-disagg) / (ceiling - fcfs-disagg) in decode throughput: how much of
    what alignment could at most win it wins. None without all three."""
    try:
        a, d, c = (summaries[k]["decode_tps"] for k in ("aligned", "fcfs-disagg", "ceiling"))
    except KeyError:
        return None
    return (a - d) / (c - d) if c > d else None
