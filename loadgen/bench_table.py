"""Markdown tables from benchmark result files (`alignedserve bench table FILE...`).

BENCHMARKS.md's tables are printed by this from the runs' `results.json`, so the numbers in
the document are the measured ones, not retyped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HEADER = ("| model | workload | system | decode tok/s | total tok/s | TTFT p50/p99 s "
          "| TPOT p50/p99 ms | pad % | switch % | ok/fail | decode vs fcfs | P99 TPOT fcfs/x |")


def _f(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f}"


def rows(data: dict[str, Any]) -> list[str]:
    cfg, systems = data["config"], data["systems"]
    label = cfg.get("label") or Path(cfg["model"]).name
    mode = "" if cfg.get("rate") is None else f" (online {cfg['rate']:g}/s)"
    base = systems.get("fcfs")
    out = []
    for name, s in systems.items():
        if s.get("error"):
            out.append(f"| {label} | {data['workload']['name']}{mode} | {name} | error: "
                       f"{s['error'][:80]} |||||||||")
            continue
        vs = (s["decode_tps"] / base["decode_tps"]) if base and base["decode_tps"] else None
        tp = (base["tpot_s"]["p99"] / s["tpot_s"]["p99"]
              if base and s["tpot_s"]["p99"] and base["tpot_s"]["p99"] else None)
        exact = "" if s["decode_tps_exact"] else "*"
        bold = "**" if name == "aligned" else ""
        out.append(
            f"| {label} | {data['workload']['name']}{mode} | {bold}{name}{bold} "
            f"| {_f(s['decode_tps'])}{exact} | {_f(s['total_tps'])} "
            f"| {_f(s['ttft_s']['p50'], digits=1)} / {_f(s['ttft_s']['p99'], digits=1)} "
            f"| {_f(s['tpot_s']['p50'], 1e3, 0)} / {_f(s['tpot_s']['p99'], 1e3, 0)} "
            f"| {_f(s['padding_pct'])} | {_f(s.get('switch_rate'), 100.0)} "
            f"| {s['completed']}/{s['failed']} | {_f(vs, digits=2)}x | {_f(tp, digits=2)}x |")
    return out


def overlap_lines(data: dict[str, Any]) -> list[str]:
    """One line per engine policy that moved KV: copies, bytes and the overlap achieved."""
    out = []
    label = data["config"].get("label") or Path(data["config"]["model"]).name
    for name, s in data["systems"].items():
        kv = s.get("kv_transfer")
        if kv and kv.get("transfers"):
            out.append(f"- {label} {data['workload']['name']} `{name}`: {kv['transfers']} KV "
                       f"copies, {kv['bytes'] / 1e9:.2f} GB, {kv['copy_s']:.2f} s on the copy "
                       f"thread, {kv['stall_s']:.2f} s stalled: {kv['overlap']:.0%} overlapped")
    return out


def markdown(paths: list[str | Path]) -> str:
    body = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    notes = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        body += rows(data)
        notes += overlap_lines(data)
    return "\n".join(body + (["", *notes] if notes else []))
