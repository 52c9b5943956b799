"""Metrics with vLLM's names, prefixed `alignedserve:`, through `ray.util.metrics`.

Ray 2.60 deprecates ':' in metric names: it warns (FutureWarning, "will be an error") and,
as tried here, the series never reaches the metrics agent's export. So the series are
registered with Ray as `alignedserve_<name>`; the Ray dashboard and a Prometheus scrape of
Ray's metrics port show `ray_alignedserve_<name>`. The router's `/metrics` serves the same
series under vLLM's convention, `alignedserve:<name>` (`prometheus_text`). Ray adds `_total`
to counters. Every series carries `model_name`. Processes push to the node's metrics agent
every few seconds (Ray's report interval), so a value appears on /metrics with a delay
(about 5-10 s).

Histogram sums: Ray's export computes a histogram's `_sum` from bucket midpoints (two
requests of 0.94 s and 3.4 s export 0.9 + 3.75), while its buckets and `_count` are exact.
So every histogram here also feeds a counter of the observed values,
`<histogram>_true_sum` (Ray exports `ray_alignedserve_<histogram>_true_sum_total`), and
`prometheus_text` puts that counter's value into the histogram's `_sum` and leaves the
counter out: on `/metrics`, `_sum / _count` is the true mean. A scrape of Ray's own port
keeps Ray's approximate `_sum`; divide `..._true_sum_total` by `..._count` there instead.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

import httpx
import ray
from ray.util.metrics import Counter, Gauge, Histogram

log = logging.getLogger("alignedserve.metrics")
RAY_PREFIX = "alignedserve_"
PUBLIC_PREFIX = "alignedserve:"
_LATENCY_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
              7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
          240.0, 480.0, 960.0]
_RATIO = [1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0]


TRUE_SUM_SUFFIX = "_true_sum"


def _m(kind, name: str, desc: str, tags: tuple[str, ...], **kw):
    return kind(RAY_PREFIX + name, description=desc, tag_keys=tags, **kw)


class SummedHistogram:
    """A Ray histogram plus a counter of the sum of its observations, so the exported sum
    is exact (see the module docstring). A negative observation (a clock step) counts as 0:
    the counter cannot go down, and a metric must never fail a request."""

    def __init__(self, name: str, desc: str, tags: tuple[str, ...],
                 boundaries: list[float]) -> None:
        self.hist = _m(Histogram, name, desc, tags, boundaries=boundaries)
        self.sum = _m(Counter, name + TRUE_SUM_SUFFIX, f"Sum of the observed values of "
                      f"{PUBLIC_PREFIX}{name} (exact; Ray's histogram _sum is approximate).",
                      tags)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        value = max(0.0, value)
        self.hist.observe(value, tags)
        if value > 0:  # Ray's Counter.inc rejects 0; a 0 adds nothing to the sum anyway
            self.sum.inc(value, tags)


class GaugeKeeper:
    """Re-sets gauges to their last values every `period_s` on a daemon thread.

    Ray drops a gauge from its export about 20 s after its last `set` (seen with Ray 2.60,
    counters and histograms stay), so an idle compute replica's queue depths and KV usage
    would vanish from /metrics instead of reading their last values. The thread starts on
    the first `set` and dies with the process, so a dead replica's gauges do expire."""

    def __init__(self, tags: dict[str, str], period_s: float = 5.0) -> None:
        self.tags = tags
        self.period_s = period_s
        self._last: dict[int, tuple[Gauge, float]] = {}  # id(gauge) -> (gauge, last value)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float) -> None:
        gauge.set(value, self.tags)
        with self._lock:
            self._last[id(gauge)] = (gauge, value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="alignedserve-gauges")
                self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with self._lock:
                last = list(self._last.values())
            for gauge, value in last:
                gauge.set(value, self.tags)


class FrontendMetrics:
    """Per-request metrics, recorded by the router that holds the client connection."""

    def __init__(self, model_name: str) -> None:
        t = ("model_name",)
        self.tags = {"model_name": model_name}
        self.ttft = SummedHistogram("time_to_first_token_seconds", "Time to first token.", t,
                                    _LATENCY_S)
        self.itl = SummedHistogram("inter_token_latency_seconds", "Time between tokens.", t,
                                   _LATENCY_S)
        self.tpot = SummedHistogram("time_per_output_token_seconds", "Mean time per output "
                                    "token after the first, per request.", t, _LATENCY_S)
        self.e2e = SummedHistogram("e2e_request_latency_seconds", "Request latency.", t,
                                   _E2E_S)
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
        self.alignment = SummedHistogram("batch_alignment_ratio", "Longest / shortest KV "
                                         "length of each decode batch.", t, _RATIO)
        self.prefetch_bytes = _m(Counter, "prefetch_bytes", "Bytes the prefetch worker moved "
                                 "between the host store and the device pool.", t)
        self.prefetch_hits = _m(Counter, "prefetch_hits", "Steps whose KV was in place.", t)
        self.prefetch_misses = _m(Counter, "prefetch_misses", "Steps that waited for KV.", t)
        self.prefetch_hit_rate = _m(Gauge, "prefetch_hit_rate", "prefetch_hits / (hits + "
                                    "misses) so far.", t)
        self.queue_time = SummedHistogram("request_queue_time_seconds", "Arrival at the "
                                          "router to first scheduled on a replica.", t, _E2E_S)
        self.gauges = GaugeKeeper(self.tags)
        self._last: dict[str, int] = {}  # cumulative totals last seen by record_step
        self._prefetched = [0, 0]  # [hits, misses] counted by record_prefetch

    def _delta(self, key: str, value: int) -> int:
        d = value - self._last.get(key, 0)
        self._last[key] = value
        return d

    def record_step(self, running: int, waiting: int, kv_usage: float, host_kv_usage: float,
                    batch_kv_lengths: list[int], switches: int, preemptions: int,
                    prefetch_bytes: int | None = None, hits: int | None = None,
                    misses: int | None = None) -> None:
        """One engine step. `switches`, `preemptions`, `prefetch_bytes`, `hits` and `misses`
        are the replica's running totals (deltas are counted here); pass the prefetch ones
        either here or per copy through `record_prefetch`, not both.
        `batch_kv_lengths`: KV length (tokens) of each running request."""
        tags = self.tags
        self.gauges.set(self.running, running)
        self.gauges.set(self.waiting, waiting)
        self.gauges.set(self.kv_usage, kv_usage)
        self.gauges.set(self.host_kv_usage, host_kv_usage)
        if batch_kv_lengths:
            self.alignment.observe(max(batch_kv_lengths) / max(1, min(batch_kv_lengths)), tags)
        for key, value, counter in (("sw", switches, self.switches),
                                    ("pre", preemptions, self.preemptions),
                                    ("pb", prefetch_bytes, self.prefetch_bytes),
                                    ("hit", hits, self.prefetch_hits),
                                    ("miss", misses, self.prefetch_misses)):
            d = 0 if value is None else self._delta(key, value)
            if d > 0:
                counter.inc(d, tags)
        if hits is not None and misses is not None and hits + misses:
            self.gauges.set(self.prefetch_hit_rate, hits / (hits + misses))

    def record_prefetch(self, nbytes: int, hit: bool) -> None:
        """One prefetch: `nbytes` copied; `hit` if the KV was in place when the step
        needed it."""
        if nbytes > 0:
            self.prefetch_bytes.inc(nbytes, self.tags)
        self._prefetched[0 if hit else 1] += 1
        (self.prefetch_hits if hit else self.prefetch_misses).inc(1, self.tags)
        self.gauges.set(self.prefetch_hit_rate, self._prefetched[0] / sum(self._prefetched))

    def record_queue_time(self, seconds: float) -> None:
        """A request was first scheduled, `seconds` after the router accepted it."""
        self.queue_time.observe(max(0.0, seconds), self.tags)


_RAY_NAME_PREFIX = "ray_" + RAY_PREFIX  # how Ray's metrics agent exports our series
# Counters the server declares. Ray exports a counter only once it was incremented, so
# one that has not moved yet (no preemption so far, say) is exported at 0: Prometheus'
# convention, and dashboards see every series from the first scrape.
COUNTERS = ("prompt_tokens", "generation_tokens", "request_success", "num_preemptions",
            "batch_switches", "prefetch_bytes", "prefetch_hits", "prefetch_misses")
_OTEL_LABEL = re.compile(r',?otel_scope_\w+="[^"]*"')


def _metrics_urls(local_only: bool) -> list[str]:
    """The metrics export endpoints of the alive Ray nodes (this node's alone if asked)."""
    here = ray.get_runtime_context().get_node_id()
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")
            and (not local_only or n["NodeID"] == here)]


def _families(text: str, into: dict[str, tuple[list[str], list[str]]]) -> None:
    """Adds our families of one Prometheus exposition to `into` (Ray name -> (HELP/TYPE
    lines, sample lines)), without OpenTelemetry scope labels. Families repeat across
    nodes; Prometheus wants each HELP/TYPE once, so they are merged."""
    family = ""
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = parts[2]
                if family.startswith(_RAY_NAME_PREFIX):
                    head = into.setdefault(family, ([], []))[0]
                    if line not in head:
                        head.append(line)
        elif family in into and line.startswith(family):
            into[family][1].append(_OTEL_LABEL.sub("", line).replace("{,", "{"))


@functools.cache
def _agents_client() -> httpx.Client:
    """One client for every scrape: `httpx.get` builds a new client, and with it an SSL
    context (about 10 ms of CPU), on each call; the router's frontend runs this on every
    /metrics request."""
    return httpx.Client()


def prometheus_text(timeout_s: float = 3.0, local_only: bool = False) -> str:
    """Every `alignedserve` series the Ray metrics agents export, in Prometheus text format,
    named `alignedserve:<name>` (vLLM's convention). Blocking (HTTP to each node's agent):
    call it from a thread in async code. Needs a connected Ray driver or worker.

    Each process's series keep Ray's labels (`WorkerId`, `NodeAddress`, ...), so sum over
    them. Processes push to their node's agent every few seconds (Ray's report interval,
    about 5-10 s), so a value shows up here with that delay. A node that does not answer
    is left out rather than failing the scrape."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for url in _metrics_urls(local_only):
        try:
            text = _agents_client().get(url, timeout=timeout_s).text
        except httpx.HTTPError as e:
            log.warning("metrics agent %s did not answer (%s); its node is left out", url, e)
            continue
        _families(text, families)
    _true_sums(families)
    _zero_counters(families)
    lines = [line.replace(_RAY_NAME_PREFIX, PUBLIC_PREFIX)
             for head, samples in families.values() for line in head + samples]
    return "\n".join(lines) + "\n" if lines else ""


def _zero_counters(families: dict[str, tuple[list[str], list[str]]]) -> None:
    """Every declared counter that nobody has incremented yet, at 0 (see COUNTERS)."""
    for name in COUNTERS:
        fam = f"{_RAY_NAME_PREFIX}{name}_total"
        families.setdefault(fam, ([f"# TYPE {fam} counter"], [f"{fam} 0"]))


def _true_sums(families: dict[str, tuple[list[str], list[str]]]) -> None:
    """Replaces each histogram's `_sum` samples by its `_true_sum` counter's value for the
    same labels (0 when the counter has none: every positive observation increments it) and
    drops the counter families. In place; `families` as `_families` fills it."""
    for name in [n for n in families if n.endswith(TRUE_SUM_SUFFIX + "_total")]:
        _, counter = families.pop(name)
        hist = name.removesuffix(TRUE_SUM_SUFFIX + "_total")
        if hist not in families:
            continue
        sums = {_labels(line): line.rsplit(" ", 1)[1] for line in counter}
        samples = families[hist][1]
        for i, line in enumerate(samples):
            if line.startswith((hist + "_sum{", hist + "_sum ")):
                samples[i] = f"{line.rsplit(' ', 1)[0]} {sums.get(_labels(line), '0.0')}"


def _labels(sample: str) -> str:
    """The `{...}` label set of one sample line ('' without labels)."""
    head = sample.rsplit(" ", 1)[0]
    return head[head.index("{"):] if "{" in head else ""
