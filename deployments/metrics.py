"""Metrics with vLLM's names, prefixed `alignedserve:`, through `ray.util.metrics`.

Ray 2.60 deprecates ':' in metric names (a FutureWarning, an error later), so the series
are registered with Ray as `alignedserve_<name>`; the Ray dashboard and a Prometheus scrape
of Ray's metrics port show `ray_alignedserve_<name>`. The router's `/metrics` serves the
same series under vLLM's convention, `alignedserve:<name>` (`prometheus_text`). Ray adds
`_total` to counters. Every series carries `model_name`. Workers push to the node's metrics
agent every few seconds (Ray's report interval), so a value appears on /metrics with a delay.
"""

from __future__ import annotations

import re

import httpx
import ray
from ray.util.metrics import Counter, Gauge, Histogram

RAY_PREFIX = "alignedserve_"
PUBLIC_PREFIX = "alignedserve:"
_LATENCY_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
              7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
          240.0, 480.0, 960.0]
_RATIO = [1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0]


def _m(kind, name: str, desc: str, tags: tuple[str, ...], **kw):
    return kind(RAY_PREFIX + name, description=desc, tag_keys=tags, **kw)


class FrontendMetrics:
    """Per-request metrics, recorded by the router that holds the client connection."""

    def __init__(self, model_name: str) -> None:
        t = ("model_name",)
        self.tags = {"model_name": model_name}
        self.ttft = _m(Histogram, "time_to_first_token_seconds", "Time to first token.", t,
                       boundaries=_LATENCY_S)
        self.itl = _m(Histogram, "inter_token_latency_seconds", "Time between tokens.", t,
                      boundaries=_LATENCY_S)
        self.tpot = _m(Histogram, "time_per_output_token_seconds", "Mean time per output "
                       "token after the first, per request.", t, boundaries=_LATENCY_S)
        self.e2e = _m(Histogram, "e2e_request_latency_seconds", "Request latency.", t,
                      boundaries=_E2E_S)
        self.prompt_tokens = _m(Counter, "prompt_tokens", "Prompt tokens processed.", t)
        self.generation_tokens = _m(Counter, "generation_tokens", "Tokens generated.", t)
        self.success = _m(Counter, "request_success", "Finished requests by reason.",
                          ("model_name", "finished_reason"))

    def request_done(self, ttft: float | None, gaps: list[float], e2e: float,
                     prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        tags = self.tags
        if ttft is not None:
            self.ttft.observe(ttft, tags)
        for g in gaps:
            self.itl.observe(g, tags)
        if gaps:
            self.tpot.observe(sum(gaps) / len(gaps), tags)
        self.e2e.observe(e2e, tags)
        self.prompt_tokens.inc(prompt_tokens, tags)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens, tags)
        self.success.inc(1, {**tags, "finished_reason": reason})


class EngineMetrics:
    """Per-step metrics of a compute replica (and its prefetch worker's copies)."""

    def __init__(self, model_name: str, replica: str) -> None:
        t = ("model_name", "replica")
        self.tags = {"model_name": model_name, "replica": replica}
        self.running = _m(Gauge, "num_requests_running", "Requests in the running batch.", t)
        self.waiting = _m(Gauge, "num_requests_waiting", "Requests waiting for a batch "
                          "(pooled in host memory, or for host room).", t)
        self.kv_usage = _m(Gauge, "kv_cache_usage_perc", "Device KV pool usage, 0-1.", t)
        self.host_kv_usage = _m(Gauge, "host_kv_cache_usage_perc", "Host KV store usage, 0-1.",
                                t)
        self.preemptions = _m(Counter, "num_preemptions", "Members swapped out to make room.", t)
        self.switches = _m(Counter, "batch_switches", "Running batch replaced.", t)
        self.alignment = _m(Histogram, "batch_alignment_ratio", "Longest / shortest KV length "
                            "of each decode batch.", t, boundaries=_RATIO)
        self.prefetch_bytes = _m(Counter, "prefetch_bytes", "Bytes the prefetch worker moved "
                                 "between the host store and the device pool.", t)
        self.prefetch_hits = _m(Counter, "prefetch_hits", "Steps whose KV was in place.", t)
        self.prefetch_misses = _m(Counter, "prefetch_misses", "Steps that waited for KV.", t)
        self.prefetch_hit_rate = _m(Gauge, "prefetch_hit_rate", "prefetch_hits / (hits + "
                                    "misses) so far.", t)
        self._last: dict[str, int] = {}

    def _delta(self, key: str, value: int) -> int:
        d = value - self._last.get(key, 0)
        self._last[key] = value
        return d

    def record_step(self, running: int, waiting: int, kv_usage: float, host_kv_usage: float,
                    batch_kv_lengths: list[int], switches: int, preemptions: int,
                    prefetch_bytes: int, hits: int, misses: int) -> None:
        """Cumulative counters in, deltas out (the replica keeps running totals)."""
        tags = self.tags
        self.running.set(running, tags)
        self.waiting.set(waiting, tags)
        self.kv_usage.set(kv_usage, tags)
        self.host_kv_usage.set(host_kv_usage, tags)
        if batch_kv_lengths:
            self.alignment.observe(max(batch_kv_lengths) / max(1, min(batch_kv_lengths)), tags)
        for key, value, counter in (("sw", switches, self.switches),
                                    ("pre", preemptions, self.preemptions),
                                    ("pb", prefetch_bytes, self.prefetch_bytes),
                                    ("hit", hits, self.prefetch_hits),
                                    ("miss", misses, self.prefetch_misses)):
            d = self._delta(key, value)
            if d > 0:
                counter.inc(d, tags)
        if hits + misses:
            self.prefetch_hit_rate.set(hits / (hits + misses), tags)


_RAY_SERIES = re.compile(r"^(# (?:HELP|TYPE) )?ray_" + RAY_PREFIX)


def prometheus_text(timeout_s: float = 5.0) -> str:
    """Our series from this node's Ray metrics agent, renamed `alignedserve:<name>`.
    Needs a connected Ray worker/driver; returns "" while the agent has nothing yet."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None or not node.get("MetricsExportPort"):
        return ""
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = httpx.get(url, timeout=timeout_s).text
    out = [_RAY_SERIES.sub(lambda m: (m.group(1) or "") + PUBLIC_PREFIX, line)
           for line in text.splitlines() if _RAY_SERIES.match(line)]
    return "\n".join(out) + "\n" if out else ""
