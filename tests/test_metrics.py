"""Metrics: recording under a real Ray, and the router's /metrics text (`prometheus_text`)
picking our series up from the metrics agent, renamed `alignedserve:<name>`, with every
series a dashboard plots checked against values computed by hand (histogram sums exact)."""

from __future__ import annotations

import re
import time

import pytest

from alignedserve.deployments.metrics import (
    COUNTERS,
    EngineMetrics,
    FrontendMetrics,
    GaugeKeeper,
    _families,
    _metrics_urls,
    _true_sums,
    _zero_counters,
    prometheus_text,
)

EXPOSITION = """# HELP ray_alignedserve_x_total Things.
# TYPE ray_alignedserve_x_total counter
ray_alignedserve_x_total{Component="core_worker",model_name="m",otel_scope_name="s",\
otel_scope_version=""} 3.0
# HELP ray_other Not ours.
# TYPE ray_other gauge
ray_other{a="b"} 1.0
# HELP ray_alignedserve_lat Latency.
# TYPE ray_alignedserve_lat histogram
ray_alignedserve_lat_bucket{le="1.0",model_name="m"} 1.0
ray_alignedserve_lat_count{model_name="m"} 1.0
"""


def test_families_merge_nodes_and_keep_only_ours():
    fams: dict = {}
    _families(EXPOSITION, fams)
    _families(EXPOSITION.replace("core_worker", "other_node"), fams)
    assert list(fams) == ["ray_alignedserve_x_total", "ray_alignedserve_lat"]
    head, samples = fams["ray_alignedserve_x_total"]
    assert head == ["# HELP ray_alignedserve_x_total Things.",
                    "# TYPE ray_alignedserve_x_total counter"]
    assert samples == ['ray_alignedserve_x_total{Component="core_worker",model_name="m"} 3.0',
                       'ray_alignedserve_x_total{Component="other_node",model_name="m"} 3.0']
    assert len(fams["ray_alignedserve_lat"][1]) == 4


TRUE_SUM_EXPOSITION = """# HELP ray_alignedserve_lat Latency.
# TYPE ray_alignedserve_lat histogram
ray_alignedserve_lat_bucket{WorkerId="a",le="1.0",model_name="m"} 1.0
ray_alignedserve_lat_bucket{WorkerId="a",le="+Inf",model_name="m"} 2.0
ray_alignedserve_lat_count{WorkerId="a",model_name="m"} 2.0
ray_alignedserve_lat_sum{WorkerId="a",model_name="m"} 4.25
ray_alignedserve_lat_sum{WorkerId="b",model_name="m"} 0.5
# HELP ray_alignedserve_lat_true_sum_total Exact.
# TYPE ray_alignedserve_lat_true_sum_total counter
ray_alignedserve_lat_true_sum_total{WorkerId="a",model_name="m"} 4.34
"""


def test_true_sums_replace_midpoint_sums_per_label_set():
    fams: dict = {}
    _families(TRUE_SUM_EXPOSITION, fams)
    _true_sums(fams)
    assert list(fams) == ["ray_alignedserve_lat"]  # the counter family is folded in
    samples = fams["ray_alignedserve_lat"][1]
    assert 'ray_alignedserve_lat_sum{WorkerId="a",model_name="m"} 4.34' in samples
    # b's histogram had no counter sample: none of its observations was > 0
    assert 'ray_alignedserve_lat_sum{WorkerId="b",model_name="m"} 0.0' in samples
    assert 'ray_alignedserve_lat_count{WorkerId="a",model_name="m"} 2.0' in samples


class _FakeGauge:
    def __init__(self) -> None:
        self.values: list[tuple[float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values.append((value, tags))


def test_counters_nobody_incremented_are_exported_at_zero():
    fams: dict = {}
    _families(EXPOSITION, fams)
    _zero_counters(fams)
    for name in COUNTERS:
        head, samples = fams[f"ray_alignedserve_{name}_total"]
        assert head == [f"# TYPE ray_alignedserve_{name}_total counter"]
        assert samples == [f"ray_alignedserve_{name}_total 0"]
    assert len(fams["ray_alignedserve_x_total"][1]) == 1  # recorded families untouched


def test_gauge_keeper_resets_last_values_until_closed():
    keeper = GaugeKeeper({"replica": "r0"}, period_s=0.02)
    a, b = _FakeGauge(), _FakeGauge()
    keeper.set(a, 1.0)
    keeper.set(a, 2.0)
    keeper.set(b, 0.5)
    time.sleep(0.3)
    keeper.close()
    time.sleep(0.1)
    n = len(a.values)
    assert a.values[:2] == [(1.0, {"replica": "r0"}), (2.0, {"replica": "r0"})]
    assert n >= 5 and all(v == (2.0, {"replica": "r0"}) for v in a.values[2:])
    assert len(b.values) >= 4 and {v for v, _ in b.values} == {0.5}
    time.sleep(0.1)
    assert len(a.values) == n  # closed: no more re-sets


@pytest.fixture(scope="module")
def ray_up():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _engine_recorder():
    """The engine side, as two compute replicas record it: replica-0 passes prefetch
    totals to record_step, replica-1 reports each copy through record_prefetch. A local
    function, so Ray ships it by value to the worker process."""

    def record_engine(model: str) -> None:
        m = EngineMetrics(model, "replica-0")
        m.record_step(running=3, waiting=2, kv_usage=0.25, host_kv_usage=0.5,
                      batch_kv_lengths=[100, 120, 150], switches=1, preemptions=0,
                      prefetch_bytes=4096, hits=3, misses=1)
        m.record_step(running=3, waiting=1, kv_usage=0.3, host_kv_usage=0.5,
                      batch_kv_lengths=[200, 200], switches=2, preemptions=1,
                      prefetch_bytes=6144, hits=5, misses=1)
        m.record_step(running=0, waiting=1, kv_usage=0.0, host_kv_usage=0.5,
                      batch_kv_lengths=[], switches=2, preemptions=1)
        m.record_queue_time(0.2)
        m.record_queue_time(0.0)
        m.record_queue_time(1.3)
        m1 = EngineMetrics(model, "replica-1")
        m1.record_prefetch(1024, hit=True)
        m1.record_prefetch(512, hit=False)
        m1.record_prefetch(0, hit=True)
        m1.record_step(running=4, waiting=0, kv_usage=0.5, host_kv_usage=0.125,
                       batch_kv_lengths=[64, 64, 64, 64], switches=0, preemptions=0)

    return record_engine


# Hand-computed from the recordings below: series -> {label filter: value}. Sums over
# processes (Ray's WorkerId etc.), as a dashboard's sum() does.
EXPECTED: dict[str, list[tuple[dict[str, str], float]]] = {
    # TTFT: one request with a first token, at 0.05 s
    "time_to_first_token_seconds_count": [({}, 1)],
    "time_to_first_token_seconds_sum": [({}, 0.05)],
    "time_to_first_token_seconds_bucket": [({"le": "0.04"}, 0), ({"le": "0.06"}, 1)],
    # ITL: gaps 0.015 and 0.03 s
    "inter_token_latency_seconds_count": [({}, 2)],
    "inter_token_latency_seconds_sum": [({}, 0.045)],
    "inter_token_latency_seconds_bucket": [({"le": "0.01"}, 0), ({"le": "0.02"}, 1),
                                           ({"le": "0.04"}, 2)],
    # TPOT: the mean gap of the one request with gaps, 0.0225 s
    "time_per_output_token_seconds_count": [({}, 1)],
    "time_per_output_token_seconds_sum": [({}, 0.0225)],
    # E2E: the issue's example, 0.94 s and 3.4 s (Ray's midpoint sum was 0.9 + 3.75)
    "e2e_request_latency_seconds_count": [({}, 2)],
    "e2e_request_latency_seconds_sum": [({}, 4.34)],
    "e2e_request_latency_seconds_bucket": [({"le": "1.0"}, 1), ({"le": "2.5"}, 1),
                                           ({"le": "5.0"}, 2)],
    # throughput
    "prompt_tokens_total": [({}, 15)],
    "generation_tokens_total": [({}, 7)],
    "request_success_total": [({"finished_reason": "stop"}, 1),
                              ({"finished_reason": "abort"}, 1)],
    # queue depths and KV usage: the last value each replica set
    "num_requests_running": [({"replica": "replica-0"}, 0), ({"replica": "replica-1"}, 4)],
    "num_requests_waiting": [({"replica": "replica-0"}, 1), ({"replica": "replica-1"}, 0)],
    "kv_cache_usage_perc": [({"replica": "replica-0"}, 0.0), ({"replica": "replica-1"}, 0.5)],
    "host_kv_cache_usage_perc": [({"replica": "replica-0"}, 0.5),
                                 ({"replica": "replica-1"}, 0.125)],
    "request_queue_time_seconds_count": [({}, 3)],
    "request_queue_time_seconds_sum": [({}, 1.5)],
    # batch alignment: ratios 1.5 (150/100), 1.0 (200/200), 1.0 (64/64)
    "batch_alignment_ratio_count": [({"replica": "replica-0"}, 2),
                                    ({"replica": "replica-1"}, 1)],
    "batch_alignment_ratio_sum": [({"replica": "replica-0"}, 2.5),
                                  ({"replica": "replica-1"}, 1.0)],
    "batch_alignment_ratio_bucket": [({"le": "1.0"}, 2), ({"le": "1.25"}, 2),
                                     ({"le": "1.5"}, 3)],
    # prefetch: replica-0 totals 5 hits / 1 miss; replica-1 copies hit, miss, hit
    "prefetch_hits_total": [({"replica": "replica-0"}, 5), ({"replica": "replica-1"}, 2)],
    "prefetch_misses_total": [({"replica": "replica-0"}, 1), ({"replica": "replica-1"}, 1)],
    "prefetch_hit_rate": [({"replica": "replica-0"}, 5 / 6), ({"replica": "replica-1"}, 2 / 3)],
    "prefetch_bytes_total": [({"replica": "replica-0"}, 6144),
                             ({"replica": "replica-1"}, 1536)],
    # switches and preemptions (running totals 2 and 1 on replica-0; none on replica-1)
    "batch_switches_total": [({"replica": "replica-0"}, 2)],
    "num_preemptions_total": [({"replica": "replica-0"}, 1)],
}


def _value(text: str, name: str, labels: dict[str, str]) -> float | None:
    """Sum of the samples of `name` (model "tiny") whose labels include `labels`; None if
    there are none."""
    labels = {"model_name": "tiny", **labels}
    found = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith(f"alignedserve:{name}{{")
             and all(f'{k}="{v}"' in line for k, v in labels.items())]
    return sum(found) if found else None


def test_metrics_record_and_reach_prometheus_text(ray_up):
    ray = ray_up
    front = FrontendMetrics("tiny")
    front.request_done(0.05, [0.015, 0.03], 0.94, prompt_tokens=11, completion_tokens=7,
                       reason="stop")
    front.request_done(None, [], 3.4, prompt_tokens=4, completion_tokens=0, reason="abort")
    # The engine side records in another process, as compute replicas do.
    ray.get(ray.remote(num_cpus=0)(_engine_recorder()).remote("tiny"))

    def mismatches(text: str) -> list[tuple[str, dict, float, float | None]]:
        return [(name, labels, want, got)
                for name, cases in EXPECTED.items() for labels, want in cases
                if (got := _value(text, name, labels)) is None
                or got != pytest.approx(want, rel=1e-9, abs=1e-12)]

    deadline = time.monotonic() + 40  # Ray exports every few seconds
    text = prometheus_text()
    while mismatches(text) and time.monotonic() < deadline:
        time.sleep(1)
        text = prometheus_text()
    assert not mismatches(text), (mismatches(text), text[:3000])
    assert "ray_alignedserve" not in text and "otel_scope" not in text
    assert "_true_sum" not in text  # folded into the histograms' _sum
    types = re.findall(r"^# TYPE (\S+)", text, flags=re.M)
    assert len(types) == len(set(types))  # each family once, as Prometheus requires
    assert prometheus_text(local_only=True)  # a single-node cluster: the same node


def test_ray_export_serves_our_series_with_exact_sum_counters(ray_up):
    """What the Ray dashboard's Prometheus scrapes: Ray's own metrics port serves our series
    as `ray_alignedserve_*`, the exact sums as `..._true_sum_total` counters."""
    import httpx

    ray = ray_up
    ray.get(ray.remote(num_cpus=0)(_engine_recorder()).remote("raw"))
    (url,) = _metrics_urls(local_only=True)
    want = ['ray_alignedserve_batch_alignment_ratio_count{', 'ray_alignedserve_'
            'batch_alignment_ratio_true_sum_total{', 'ray_alignedserve_prefetch_hits_total{',
            'ray_alignedserve_num_requests_running{']
    deadline = time.monotonic() + 40
    text = httpx.get(url, timeout=5).text
    while time.monotonic() < deadline and not all(
            any(w in line and 'model_name="raw"' in line for line in text.splitlines())
            for w in want):
        time.sleep(1)
        text = httpx.get(url, timeout=5).text
    lines = [line for line in text.splitlines() if 'model_name="raw"' in line]
    for w in want:
        assert any(line.startswith(w) for line in lines), (w, lines[:20])
    true_sum = sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(
        "ray_alignedserve_batch_alignment_ratio_true_sum_total{"))
    assert true_sum == pytest.approx(3.5)  # 1.5 + 1.0 + 1.0
