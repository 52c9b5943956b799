"""The aligned policy beside every baseline and the ceiling, in the GPU simulator (issue 11).

One command writes what the policy's BENCHMARKS section shows:
- offline decode throughput of `aligned` and the baselines (`fcfs`, `fcfs-disagg`,
  `fcfs-sorted`, `ceiling`) for each model x workload under the `vllm` kernel model, with
  how much of the way from `fcfs-disagg` to the ceiling `aligned` closes, swap-outs per
  request and the candidate-buffer hit rate;
- `aligned`'s gain over `fcfs-disagg` under each decode kernel model (one model/workload);
- online capacity at a P99 TPOT SLO (`sim capacity`'s search) per system;
as `results.json`, `table.md` and `results.png` under `--out`.

    python -m alignedserve.sim.policy_report --out docs/sim/policy-v2   # make bench-policy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignedserve.sim.config import SimConfig
from alignedserve.sim.plan import capacity
from alignedserve.sim.run import gap_closed, run_sim

SYSTEMS = ("aligned", "fcfs", "fcfs-disagg", "fcfs-sorted", "ceiling")
MODELS = ("opt-2.7b", "opt-13b")
WORKLOADS = ("mix95", "mix70", "sharegpt", "azure-conv", "longbench")
KERNELS = ("v1", "vllm", "split", "fluid")


def _row(model: str, workload: str, kernel: str, res: dict[str, dict[str, Any]]
         ) -> dict[str, Any]:
    counters = res["aligned"]["counters"]
    hosted = counters.get("host_refills", 0)
    return {
        "model": model, "workload": workload, "kernel": kernel,
        "decode_tps": {k: v["decode_tps"] for k, v in res.items()},
        "tpot_p99_ms": {k: v["tpot_p99_ms"] for k, v in res.items()},
        "straggler_s": {k: v["straggler_s"] for k, v in res.items()},
        "ttft_p99_s": {k: v["ttft_p99_s"] for k, v in res.items()},
        "gap_closed": gap_closed(res),
        "swap_outs_per_request": counters.get("swap_outs", 0) / res["aligned"]["completed"],
        "refill_hit_rate": counters.get("refill_hits", 0) / hosted if hosted else None,
        "starved": counters.get("starved", 0),
    }


def offline(models: tuple[str, ...], workloads: tuple[str, ...], kernels: tuple[str, ...],
            n: int, gpus: int, workers: int) -> list[dict[str, Any]]:
    """Every (kernel, model, workload): all SYSTEMS on one workload draw."""
    runs = [(k, m, w) for k in kernels for m in models for w in workloads]
    rows = []
    for kernel, model, workload in (bar := tqdm(runs, desc="offline", unit="run")):
        bar.set_postfix_str(f"{kernel} {model} {workload}")
        base = SimConfig(hardware="h100-sxm", model=model, kernel=kernel)
        res = run_sim(base, workload, n, gpus, systems=SYSTEMS, parity="compute",
                      workers=workers)
        rows.append(_row(model, workload, kernel, res))
    return rows


def online(model: str, workloads: tuple[str, ...], slo_ms: float, seeds: int = 1
           ) -> list[dict[str, Any]]:
    """Each system's capacity on `seeds` workload draws, and their mean: one draw of 300
    arrivals decides a rate only to within a draw's luck and the search's 5% step."""
    out = []
    for workload in (bar := tqdm(workloads, desc="capacity", unit="workload")):
        base = SimConfig(hardware="h100-sxm", model=model, kernel="vllm")
        for system in SYSTEMS:
            bar.set_postfix_str(f"{workload} {system}")
            cs = [capacity(base, system, workload, slo_ms, seed=seed) for seed in range(seeds)]
            out.append({"model": model, "workload": workload, "system": system,
                        "rate_per_pair": sum(c.rate for c in cs) / len(cs),
                        "rates": [c.rate for c in cs],
                        "tpot_p99_ms": sum(c.tpot_p99_ms for c in cs) / len(cs),
                        "ttft_p99_s": sum(c.ttft_p99_s for c in cs) / len(cs)})
    return out


def markdown(rows: list[dict[str, Any]], caps: list[dict[str, Any]]) -> str:
    head = ("| model | workload | " + " | ".join(SYSTEMS)
            + " | aligned / fcfs-disagg | aligned / fcfs-sorted | ceiling / fcfs-disagg "
            "| gap closed | straggler s aligned / fcfs-disagg | swap-outs / req | refill hits |")
    lines = [head, "|---" * (len(SYSTEMS) + 9) + "|"]
    for r in (r for r in rows if r["kernel"] == "vllm"):
        t = r["decode_tps"]
        hit = "-" if r["refill_hit_rate"] is None else f"{r['refill_hit_rate']:.0%}"
        gap = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
        strag = r["straggler_s"]
        lines.append(
            f"| {r['model']} | {r['workload']} | "
            + " | ".join(f"{t[s]:,.0f}" for s in SYSTEMS)
            + f" | {t['aligned'] / t['fcfs-disagg']:.3f}x | {t['aligned'] / t['fcfs-sorted']:.3f}x"
            f" | {t['ceiling'] / t['fcfs-disagg']:.3f}x | {gap} "
            f"| {strag['aligned']:.1f} / {strag['fcfs-disagg']:.1f} "
            f"| {r['swap_outs_per_request']:.2f} | {hit} |")
    kernels = [r for r in rows if r["kernel"] != "vllm"]
    if kernels:
        lines += ["", "| kernel | model | workload | aligned / fcfs-disagg | ceiling / fcfs-disagg "
                  "| gap closed |", "|---" * 6 + "|"]
        for r in kernels:
            t = r["decode_tps"]
            gap = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.0%}"
            lines.append(f"| {r['kernel']} | {r['model']} | {r['workload']} "
                         f"| {t['aligned'] / t['fcfs-disagg']:.3f}x "
                         f"| {t['ceiling'] / t['fcfs-disagg']:.3f}x | {gap} |")
    if caps:
        lines += ["", "| model | workload | system | req/s per pair (mean) | per draw "
                  "| P99 TPOT ms | P99 TTFT s |", "|---" * 7 + "|"]
        lines += [f"| {c['model']} | {c['workload']} | {c['system']} | {c['rate_per_pair']:.2f} "
                  f"| {', '.join(f'{r:.2f}' for r in c['rates'])} "
                  f"| {c['tpot_p99_ms']:.1f} | {c['ttft_p99_s']:.1f} |" for c in caps]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["kernel"] == "vllm"]
    shown = [s for s in SYSTEMS if s != "fcfs-disagg"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 1.1), 4.5))
    width = 0.8 / len(shown)
    for k, s in enumerate(shown):
        ax.bar(x + k * width, [r["decode_tps"][s] / r["decode_tps"]["fcfs-disagg"] for r in rows],
               width, label=s)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x + 0.4 - width / 2, [f"{r['model']}\n{r['workload']}" for r in rows],
                  fontsize=8)
    ax.set_ylabel("decode tok/s / fcfs-disagg")
    ax.set_ylim(0.3, None)
    ax.set_title("Offline decode throughput vs fcfs-disagg (vllm kernel model, 8 pairs)")
    ax.legend(fontsize=8, ncol=len(shown))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results/policy"))
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--gpus", type=int, default=8, help="compute devices per system")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--kernel-model", default="opt-13b", help="model of the kernel table")
    ap.add_argument("--kernel-workload", default="mix95")
    ap.add_argument("--capacity-workloads", default="sharegpt,mix95",
                    help="online capacity runs (opt-13b); '' skips them")
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0)
    ap.add_argument("--capacity-seeds", type=int, default=3,
                    help="workload draws per capacity search (the table shows their mean)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = offline(tuple(args.models.split(",")), tuple(args.workloads.split(",")), ("vllm",),
                   args.num_requests, args.gpus, args.workers)
    rows += offline((args.kernel_model,), (args.kernel_workload,),
                    tuple(k for k in KERNELS if k != "vllm"), args.num_requests, args.gpus,
                    args.workers)
    caps = online("opt-13b", tuple(w for w in args.capacity_workloads.split(",") if w),
                  args.slo_tpot_ms, args.capacity_seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"offline": rows, "capacity": caps, "wall_s": time.perf_counter() - t0,
         "command": "python -m alignedserve.sim.policy_report " + " ".join(argv or [])},
        indent=1))
    table = markdown(rows, caps)
    (args.out / "table.md").write_text(table)
    plot(rows, args.out / "results.png")
    print(table)
    print(f"wrote {args.out}/results.json, table.md and results.png")


if __name__ == "__main__":
    main()
