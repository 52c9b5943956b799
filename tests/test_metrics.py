"""Metrics: recording under a real Ray, and the router's /metrics text (`prometheus_text`)
picking our series up from the metrics agent, renamed `alignedserve:<name>`."""

from __future__ import annotations

import re
import time

import pytest

from alignedserve.deployments.metrics import (
    EngineMetrics,
    FrontendMetrics,
    _families,
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


@pytest.fixture(scope="module")
def ray_up():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_metrics_record_and_reach_prometheus_text(ray_up):
    ray = ray_up
    front = FrontendMetrics("tiny")
    front.request_done(0.05, [0.01, 0.02], 0.2, prompt_tokens=11, completion_tokens=7,
                       reason="stop")
    front.request_done(None, [], 0.1, prompt_tokens=4, completion_tokens=0, reason="abort")

    def record_engine(model: str) -> None:  # local, so Ray ships it by value
        m = EngineMetrics(model, "replica-0")
        m.record_step(running=3, waiting=2, kv_usage=0.25, host_kv_usage=0.5,
                      batch_kv_lengths=[100, 120, 150], switches=1, preemptions=0,
                      prefetch_bytes=4096, hits=3, misses=1)
        m.record_step(running=3, waiting=1, kv_usage=0.3, host_kv_usage=0.5,
                      batch_kv_lengths=[], switches=2, preemptions=1)
        m.record_prefetch(1024, hit=True)
        m.record_queue_time(0.2)

    # The engine side records in another process, as a compute replica does.
    ray.get(ray.remote(num_cpus=0)(record_engine).remote("tiny"))

    want = ["time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count",
            "time_per_output_token_seconds_count", "e2e_request_latency_seconds_bucket",
            "prompt_tokens_total", "generation_tokens_total", "request_success_total",
            "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
            "host_kv_cache_usage_perc", "num_preemptions_total", "batch_switches_total",
            "batch_alignment_ratio_bucket", "prefetch_bytes_total", "prefetch_hits_total",
            "prefetch_misses_total", "prefetch_hit_rate", "request_queue_time_seconds_count"]
    deadline = time.monotonic() + 30  # Ray exports every few seconds
    text = ""
    while time.monotonic() < deadline:
        text = prometheus_text()
        if all(f"alignedserve:{w}{{" in text for w in want):
            break
        time.sleep(1)
    missing = [w for w in want if f"alignedserve:{w}{{" not in text]
    assert not missing, (missing, text[:2000])
    assert "ray_alignedserve" not in text and "otel_scope" not in text

    def value(name: str, **labels: str) -> float:
        for line in text.splitlines():
            if line.startswith(f"alignedserve:{name}{{") and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} {labels}")

    assert value("prompt_tokens_total", model_name="tiny") == 15
    assert value("generation_tokens_total", model_name="tiny") == 7
    assert value("request_success_total", finished_reason="stop") == 1
    assert value("request_success_total", finished_reason="abort") == 1
    assert value("num_requests_running", replica="replica-0") == 3
    assert value("batch_switches_total") == 2 and value("num_preemptions_total") == 1
    assert value("prefetch_bytes_total") == 4096 + 1024
    assert value("batch_alignment_ratio_count") == 1
    assert value("inter_token_latency_seconds_count") == 2
    types = re.findall(r"^# TYPE (\S+)", text, flags=re.M)
    assert len(types) == len(set(types))  # each family once, as Prometheus requires
    assert prometheus_text(local_only=True)  # a single-node cluster: the same node
