"""Locust against a real `alignedserve serve` (its own Redis and Ray, tiny model, loopback):
a ~20 s headless run with both user classes records HTTP and gRPC requests and their TTFT /
TPOT / ITL events with no failure. The same live server's /metrics then has every metric
name the Grafana dashboard in the Helm chart queries."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cli_server import start_cli_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadgen" / "locustfile.py"
DASHBOARD = REPO / "helm" / "alignedserve" / "dashboards" / "alignedserve.json"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """(HTTP base URL, gRPC target) of a served tiny model; drained and stopped after."""
    # Prefill on the prefetch worker: every request's KV then moves through the prefetch
    # path, so the dashboard's prefetch panels have data (with prefill on the replica, the
    # default for one CPU replica, KV moves only when memory forces a swap).
    srv = start_cli_server(tiny_dir, tmp_path_factory.mktemp("locust-serve"), "locust-test:",
                           "--drain-timeout-s", "5", config="prefill_on: worker\n")
    try:
        yield srv.base, srv.grpc
        assert srv.stop() == 0  # drains, stops Serve, Ray and its Redis
    finally:
        srv.kill()


def _stats(csv_prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_headless_http_and_grpc(server, tiny_dir, tmp_path):
    base, grpc_target = server
    prefix = tmp_path / "run"
    env = {**os.environ, "ALIGNEDSERVE_LOCUST_MODEL": "tiny",
           "ALIGNEDSERVE_LOCUST_TOKENIZER": str(tiny_dir),
           "ALIGNEDSERVE_LOCUST_GRPC": grpc_target,
           "ALIGNEDSERVE_LOCUST_MAX_PROMPT": "48", "ALIGNEDSERVE_LOCUST_MAX_TOKENS": "16"}
    out = subprocess.run(
        [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", base,
         "-u", "4", "-r", "4", "--run-time", "20s", "--stop-timeout", "30",
         "--csv", str(prefix), "--html", str(tmp_path / "report.html"), "--only-summary",
         "OpenAIHTTPUser", "GrpcUser"],
        capture_output=True, text=True, env=env, timeout=180, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    stats = _stats(prefix)
    for kind, names in (("HTTP", ("completions", "chat")), ("gRPC", ("Generate",))):
        for name in (*names, "ttft", "tpot", "itl"):
            row = stats.get((kind, name))
            assert row is not None and int(row["Request Count"]) > 0, (kind, name, stats)
            assert int(row["Failure Count"]) == 0, row
    total = stats[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, total
    # the timing events are consistent with the requests they come from
    for kind, req in (("HTTP", "completions"), ("gRPC", "Generate")):
        assert float(stats[(kind, "ttft")]["Median Response Time"]) <= float(
            stats[(kind, req)]["Max Response Time"])
    assert (tmp_path / "report.html").stat().st_size > 0


def _dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"]
              if isinstance(v.get("query"), dict)]
    return {n for e in exprs for n in re.findall(r"\balignedserve:[A-Za-z0-9_]+", e)}


def test_dashboard_queries_only_metrics_the_server_exports(server):
    """After the locust run every series has values; Ray exports every few seconds."""
    base, _ = server
    wanted = _dashboard_metric_names()
    assert len(wanted) >= 20, wanted
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        exported = set(re.findall(r"^(alignedserve:[A-Za-z0-9_]+)[{ ]", text, flags=re.M))
        missing = wanted - exported
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"missing: {sorted(missing)}\nexported: {sorted(exported)}"
