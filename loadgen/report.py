"""Benchmark records, their metrics, and the outputs: JSON, a PNG and a rich table.

Metric definitions (every system, same run, same requests):
- output_tps: useful generated tokens / wall. Useful = at most the request's max_tokens.
- total_tps: (prompt + useful generated tokens of completed requests) / wall.
- decode_tps: decode tokens / decode seconds, where the system can separate them
  (`decode_tps_exact`); otherwise output_tps. Engine: tokens sampled in steps with no
  prefill work / (wall - seconds of steps that did prefill work). hf-static: tokens after
  each request's first / time from each batch's first token to its last.
- TTFT: first token - arrival. TPOT: (own last token - first token) / (generated - 1).
  E2E: result available - arrival (hf-static: when the whole batch returns).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RATIO_METRICS = ("decode_tps", "output_tps", "total_tps")


@dataclass(frozen=True)
class RequestRecord:
    """What one system did with one request. Times are seconds since the run started."""

    prompt_len: int  # prompt tokens
    requested: int  # max_tokens asked for
    generated: int  # useful tokens produced (<= requested)
    arrival_s: float
    first_token_s: float | None  # None when no token came out
    last_token_s: float | None  # the request's own last useful token
    done_s: float | None  # when the caller could have the result
    ok: bool  # completed with all requested tokens
    token_ids: tuple[int, ...]  # useful tokens, for cross-system agreement


@dataclass(frozen=True)
class SystemRun:
    """One system's pass over the workload; filled by the engine loop or a peer runner."""

    name: str  # policy name ("fcfs", "aligned") or peer name ("hf-static", "hf-cb")
    kind: str  # "engine" | "peer"
    wall_s: float  # first request submitted -> last result back
    requests: tuple[RequestRecord, ...]
    decode_tokens: int  # numerator of decode_tps
    decode_s: float | None  # denominator of decode_tps; None: cannot separate from prefill
    iteration_s: tuple[float, ...]  # per-iteration (step) latencies, seconds
    padding_pct: float | None  # attention work on padding / all attention work, percent
    batch_change_rate: float | None  # iterations whose batch changed / iterations
    error: str | None = None  # set when the system failed; metrics are then partial
    notes: str = ""
    switch_rate: float | None = None  # batch-level switches / iterations (aligned policy)
    kv_transfer: dict[str, float] | None = None  # host<->device copies: bytes, s, overlap
    scheduler: dict[str, int] | None = None  # policy counters (batches, starved, ...)


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)),
            "mean": float(arr.mean())}


def summarize(run: SystemRun) -> dict[str, Any]:
    done = [r for r in run.requests if r.ok]
    generated = sum(r.generated for r in run.requests)
    prompt = sum(r.prompt_len for r in done)
    wall = run.wall_s
    exact = run.decode_s is not None and run.decode_s > 0

    def per_s(tokens: float, seconds: float) -> float | None:
        return tokens / seconds if seconds > 0 else None  # a failed system ran no time

    it = np.asarray(run.iteration_s) if run.iteration_s else None
    return {
        "name": run.name, "kind": run.kind, "error": run.error, "notes": run.notes,
        "requests": len(run.requests), "completed": len(done),
        "failed": len(run.requests) - len(done),
        "prompt_tokens": prompt, "generated_tokens": generated, "wall_s": wall,
        "decode_tps": per_s(run.decode_tokens, run.decode_s) if exact else per_s(generated, wall),
        "decode_tps_exact": exact,
        "output_tps": per_s(generated, wall),
        "total_tps": per_s(prompt + generated, wall),
        "ttft_s": _pct([r.first_token_s - r.arrival_s for r in run.requests
                        if r.first_token_s is not None]),
        "tpot_s": _pct([(r.last_token_s - r.first_token_s) / (r.generated - 1)
                        for r in run.requests
                        if r.first_token_s is not None and r.last_token_s is not None
                        and r.generated > 1]),
        "e2e_s": _pct([r.done_s - r.arrival_s for r in run.requests if r.done_s is not None]),
        "iteration_s": None if it is None else {
            "count": len(it), "p50": float(np.percentile(it, 50)),
            "p90": float(np.percentile(it, 90)), "p99": float(np.percentile(it, 99)),
            "max": float(it.max()),
        },
        "padding_pct": run.padding_pct,
        "batch_change_rate": run.batch_change_rate,
        "switch_rate": run.switch_rate,
        "kv_transfer": run.kv_transfer,
        "scheduler": run.scheduler,
    }


def token_match(run: SystemRun, ref: SystemRun) -> float | None:
    """Fraction of requests both completed whose useful tokens are identical (greedy)."""
    pairs = [(a, b) for a, b in zip(run.requests, ref.requests, strict=False) if a.ok and b.ok]
    if not pairs:
        return None
    return sum(a.token_ids == b.token_ids for a, b in pairs) / len(pairs)


def compute_ratios(
    summaries: dict[str, dict[str, Any]], refs: list[str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """ratios[ref][system][metric] = system's metric / ref's metric, for every usable ref."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for ref in refs:
        base = summaries.get(ref)
        if base is None or base["completed"] == 0:
            continue
        out[ref] = {
            name: {m: (s[m] / base[m] if s[m] and base[m] else None) for m in RATIO_METRICS}
            for name, s in summaries.items() if name != ref
        }
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def default(obj: object) -> object:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)  # type: ignore[arg-type]
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot serialize {type(obj).__name__}")

    path.write_text(json.dumps(payload, indent=2, default=default))


def plot_png(path: Path, summaries: dict[str, dict[str, Any]], runs: list[SystemRun],
             title: str) -> None:
    """Left: decode and output tok/s per system. Right: per-iteration latency CDFs."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt

    fig, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(summaries)
    x = np.arange(len(names))
    for i, (metric, label) in enumerate((("decode_tps", "decode"), ("output_tps", "output"))):
        vals = [summaries[n][metric] or 0.0 for n in names]
        rects = bars.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=f"{label} tok/s")
        bars.bar_label(rects, fmt="%.0f", fontsize=8)
    bars.set_xticks(x, names)
    bars.set_ylabel("tokens / s")
    bars.set_title("throughput")
    bars.legend()
    for run in runs:
        if not run.iteration_s:
            continue
        ms = np.sort(np.asarray(run.iteration_s)) * 1e3
        style = "-" if run.kind == "engine" else "--"
        cdf.plot(ms, np.arange(1, len(ms) + 1) / len(ms), style, label=run.name)
    cdf.set_xscale("log")
    cdf.set_xlabel("iteration latency (ms)")
    cdf.set_ylabel("CDF")
    cdf.set_title("per-iteration latency")
    cdf.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def print_table(summaries: dict[str, dict[str, Any]], ratios: dict[str, Any],
                baseline: str, hw: dict[str, Any] | None, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("system", "decode tok/s", "output tok/s", "total tok/s", "wall s",
                "TTFT p50/p99 s", "TPOT p50/p99 ms", "E2E p50/p99 s", "pad %", "switch %",
                "ok/fail", f"decode vs {baseline}"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for name, s in summaries.items():
        vs = ratios.get(baseline, {}).get(name, {}).get("decode_tps")
        exact = "" if s["decode_tps_exact"] else "*"
        table.add_row(
            name + (" (error)" if s["error"] else ""),
            _fmt(s["decode_tps"]) + exact, _fmt(s["output_tps"]), _fmt(s["total_tps"]),
            _fmt(s["wall_s"], digits=2),
            f"{_fmt(s['ttft_s']['p50'], digits=2)}/{_fmt(s['ttft_s']['p99'], digits=2)}",
            f"{_fmt(s['tpot_s']['p50'], 1e3)}/{_fmt(s['tpot_s']['p99'], 1e3)}",
            f"{_fmt(s['e2e_s']['p50'], digits=2)}/{_fmt(s['e2e_s']['p99'], digits=2)}",
            _fmt(s["padding_pct"]), _fmt(s["switch_rate"], 100.0),
            f"{s['completed']}/{s['failed']}",
            "1.00x" if name == baseline else (_fmt(vs, digits=2) + "x" if vs else "-"),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and pipes: don't squeeze columns to 80
    console.print(table)
    console.print("* decode and prefill share steps: decode tok/s = generated / wall")
    for name, s in summaries.items():
        kv = s.get("kv_transfer")
        if kv and kv["transfers"]:
            console.print(
                f"{name}: {kv['transfers']} host<->device KV copies, {kv['bytes'] / 1e9:.2f} GB "
                f"in {kv['copy_s']:.2f} s on the copy thread; step loop stalled "
                f"{kv['stall_s']:.2f} s -> {kv['overlap']:.0%} of copy time overlapped")
    if hw:
        m, d = hw["machine"], hw.get("decode_bound")
        console.print(
            f"machine: copy {m['copy_gbps']:.1f} GB/s, read {m['read_gbps']:.1f} GB/s, "
            f"GEMM fp32 {m['gemm_gflops']['float32']:.0f} / bf16 "
            f"{m['gemm_gflops']['bfloat16']:.1f} GFLOP/s ({m['threads']} threads)"
        )
        if hw.get("decode_bound_error"):
            console.print(f"batch-1 decode probe failed: {hw['decode_bound_error']}")
        if d:
            console.print(
                f"batch-1 decode: {1 / d['step_s_median']:.1f} tok/s, "
                f"{d['achieved_gbps']:.1f} GB/s = {d['mem_bw_fraction']:.0%} of copy bandwidth "
                f"(ceiling {d['bound_tps_batch1']:.0f} tok/s); compute bound at large batch "
                f"{d['compute_bound_tps']:.0f} tok/s"
            )
