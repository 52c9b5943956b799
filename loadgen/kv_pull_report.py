"""The cross-node KV pull benchmark's report (`kv_pull_bench.py`): its result rows, their
markdown table and their plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LINK_GBPS = (25.0, 12.5)  # network links whose wire time is printed for context, GB/s


@dataclass(frozen=True)
class PullPoint:
    model: str
    kv_tokens: int  # the request's KV length
    blocks: int  # ceil(kv_tokens / block_size)
    bytes: int  # blocks x block bytes: what each path moves per request
    cross_ms: dict[str, float]  # "p50" / "p90" of allocate + pull_into + remote Free
    same_ms: dict[str, float]  # "p50" / "p90" of index_select + index_copy_
    cross_gbps: float  # bytes / cross p50
    same_gbps: float  # bytes / same p50 (the copy reads and writes each byte twice)
    cross_over_same: float  # cross p50 / same p50
    added_ms: float  # cross p50 - same p50: what pulling from another node adds per request
    link_ms: dict[str, float]  # "<rate> GB/s" -> bytes / rate: a real link's wire time alone
    verified_copies: int  # copies whose destination torch.equal'd the source (all, warm-ups too)
    samples_ms: dict[str, list[float]]  # "cross" / "same" -> every timed copy


def markdown(points: list[dict]) -> str:
    links = " | ".join(f"{g:g} GB/s link ms" for g in LINK_GBPS)
    lines = [f"| model | KV tokens | MB | cross p50 / p90 ms | same p50 / p90 ms | cross GB/s "
             f"| same GB/s | cross / same | added ms | {links} |", "|---" * 11 + "|"]
    for p in points:
        c, s = p["cross_ms"], p["same_ms"]
        wire = " | ".join(f"{v:.3g}" for v in p["link_ms"].values())
        lines.append(
            f"| {p['model']} | {p['kv_tokens']:,} | {p['bytes'] / 1e6:,.2f} "
            f"| {c['p50']:,.2f} / {c['p90']:,.2f} | {s['p50']:,.2f} / {s['p90']:,.2f} "
            f"| {p['cross_gbps']:.2f} | {p['same_gbps']:.2f} | {p['cross_over_same']:.1f}x "
            f"| {p['added_ms']:,.2f} | {wire} |")
    return "\n".join(lines)


def plot(points: list[PullPoint], path: Path) -> None:
    """Median latency (bars up to p90) against KV length, both paths, log-log."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the benchmark machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, model in enumerate(dict.fromkeys(p.model for p in points)):
        ps = [p for p in points if p.model == model]
        x = [p.kv_tokens for p in ps]
        for route, style, name in (("cross", "o-", "cross-node gRPC"),
                                   ("same", "s--", "same-node shm")):
            p50 = np.array([getattr(p, f"{route}_ms")["p50"] for p in ps])
            p90 = np.array([getattr(p, f"{route}_ms")["p90"] for p in ps])
            ax.errorbar(x, p50, yerr=[np.zeros_like(p50), p90 - p50], fmt=style,
                        color=f"C{i}", capsize=3, label=f"{model}: {name}")
        ax.plot(x, [p.link_ms[f"{LINK_GBPS[0]:g} GB/s"] for p in ps], ":", color=f"C{i}",
                alpha=0.6, label=f"{model}: {LINK_GBPS[0]:g} GB/s link wire time")
    ax.set_xscale("log", base=2)
    ticks = sorted({p.kv_tokens for p in points})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("request KV length (tokens)")
    ax.set_ylabel("latency per request (ms), median, bar to p90")
    ax.set_title("moving one request's KV into this node's store\n(cross-node = loopback TCP)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
