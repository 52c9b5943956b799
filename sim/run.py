"""`alignedserve sim run`: one workload through simulated policies on a simulated cluster.

GPU parity: `gpus` devices per system. `fcfs` runs them as `gpus` independent replicas (the
vLLM baseline); `aligned` runs them as `gpus / 2` compute + prefetch pairs, the prefetch
device running prefill and carrying KV (GPU-Prefetch-For-GPU). `aligned-noprefetch` is the
paper's ablation: `gpus` compute devices, no prefetch devices, KV over each one's PCIe.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from alignedserve.loadgen.workloads import make_workload
from alignedserve.sim.cluster import PairResult, SimConfig, simulate
from alignedserve.sim.cost_model import model

SYSTEMS = ("aligned", "fcfs", "aligned-noprefetch")


def system_config(base: SimConfig, system: str, gpus: int) -> SimConfig:
    if system == "aligned":
        return replace(base, policy="aligned", prefetch=True, pairs=max(1, gpus // 2))
    if system == "aligned-noprefetch":
        return replace(base, policy="aligned", prefetch=False, pairs=gpus)
    if system == "fcfs":
        return replace(base, policy="fcfs", prefetch=False, pairs=gpus)
    raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")


def summarize(results: list[PairResult], workload: list) -> dict[str, Any]:
    """Cluster-level metrics from per-pair results (simulated seconds)."""
    arrival = {f"r{k}": w.arrival_s for k, w in enumerate(workload)}
    gen = {f"r{k}": w.max_tokens for k, w in enumerate(workload)}
    first = {k: v for r in results for k, v in r.first_token.items()}
    finish = {k: v for r in results for k, v in r.finish.items()}
    end = max(r.end_s for r in results)
    ttft = np.array([first[k] - arrival[k] for k in first])
    tpot = np.array([(finish[k] - first[k]) / (gen[k] - 1) for k in finish if gen[k] > 1])
    steps = np.concatenate([np.asarray(r.step_s) for r in results if r.step_s])

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if len(a) else float("nan")

    return {
        "completed": len(finish), "makespan_s": end,
        "decode_tps": sum(gen[k] for k in finish) / end if end else 0.0,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_ms": pct(tpot, 50) * 1e3, "tpot_p99_ms": pct(tpot, 99) * 1e3,
        "step_p50_ms": pct(steps, 50) * 1e3, "step_p99_ms": pct(steps, 99) * 1e3,
        "steps": len(steps),
        "switch_rate": sum(r.switches for r in results) / max(1, len(steps)),
        "stall_s": sum(r.stall_s for r in results),
    }


def run_sim(base: SimConfig, workload_name: str, num_requests: int, gpus: int,
            systems: tuple[str, ...] = SYSTEMS, seed: int = 0, len_scale: float = 1.0,
            rate: float | None = None) -> dict[str, dict[str, Any]]:
    m = model(base.model)
    wl = make_workload(workload_name, num_requests, m.vocab, seed=seed, len_scale=len_scale,
                       mode="offline" if rate is None else "online", rate=rate)
    out = {}
    for system in systems:
        t0 = time.perf_counter()
        results = simulate(system_config(base, system, gpus), wl)
        out[system] = summarize(results, wl) | {"sim_wall_s": time.perf_counter() - t0}
    return out


def print_table(summaries: dict[str, dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = ("system", "decode tok/s", "vs fcfs", "TTFT p50/p99 s", "TPOT p50/p99 ms",
            "step p50/p99 ms", "switch %", "copy stall s", "sim wall s")
    for c in cols:
        table.add_column(c, justify="left" if c == "system" else "right")
    base = summaries.get("fcfs", {}).get("decode_tps")
    for name, s in summaries.items():
        table.add_row(
            name, f"{s['decode_tps']:.0f}", f"{s['decode_tps'] / base:.2f}x" if base else "-",
            f"{s['ttft_p50_s']:.1f}/{s['ttft_p99_s']:.1f}",
            f"{s['tpot_p50_ms']:.1f}/{s['tpot_p99_ms']:.1f}",
            f"{s['step_p50_ms']:.1f}/{s['step_p99_ms']:.1f}", f"{100 * s['switch_rate']:.1f}",
            f"{s['stall_s']:.1f}", f"{s['sim_wall_s']:.1f}")
    Console(width=160).print(table)
