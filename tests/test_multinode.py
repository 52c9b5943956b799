"""The cluster on a real multi-node Ray cluster, all on this machine: a head node (the Serve
controller, the proxy, the router) and two worker nodes, each with one compute replica and
its prefetch worker (placed by a custom resource only the worker nodes have) and its own KV
store, serving gRPC on loopback. Real Redis, real HTTP.

Runs in order: outputs on two nodes, a forced cross-node decode (KV over gRPC), then one
worker node killed mid-load.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import pytest
from cli_server import start_cli_server

from alignedserve import LLM, SamplingParams
from alignedserve.config import ServeConfig

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "a b c d e f g h i j k l m n o p", "hello",
           " ".join(["word"] * 90), "one two three", "multi node serving"]
DECODE = "as_decode"  # the worker nodes' custom resource


@pytest.fixture(scope="module")
def nodes(tiny_dir, redis_url, tmp_path_factory):
    """The cluster, then `alignedserve serve --ray-address auto` joining it as a user would
    (a subprocess; its config places replicas by resource and routers on the head)."""
    from ray.cluster_utils import Cluster

    # Ray takes a node as dead after 3 missed 1 s health checks (default: 5 x 3 s).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    server = None
    try:
        workers = [cluster.add_node(num_cpus=1, resources={DECODE: 1}) for _ in range(2)]
        prefix = f"mn{uuid.uuid4().hex[:6]}:"
        server = start_cli_server(
            tiny_dir, tmp_path_factory.mktemp("multinode"), prefix, "--ray-address", "auto",
            redis_url=redis_url, config=(
                "num_replicas: 2\nreplica_cpus: 0.5\nworker_cpus: 0.5\nrouter_cpus: 0.1\n"
                f"replica_resources: {{{DECODE}: 1}}\n"
                "router_resources: {'node:__internal_head__': 0.01}\n"
                "kv_grpc_host: 127.0.0.1\ndrain_timeout_s: 5\nreplica_timeout_s: 8\n"
                "engine:\n  kv_cache_gib: 0.02\n  min_batch: 4\n  max_num_seqs: 32\n"
                "  dtype: float32\n"))
        cfg = ServeConfig(model=str(tiny_dir), served_model_name="tiny",
                          http_port=int(server.base.rsplit(":", 1)[1]), redis_url=redis_url,
                          redis_prefix=prefix, start_redis=False, host_kv_gib=0.05,
                          engine={"kv_cache_gib": 0.02, "dtype": "float32"})
        yield cfg, cluster, workers
        assert server.stop() == 0, server.output()[-3000:]
    finally:
        if server is not None:
            server.kill()
        cluster.shutdown()


def _status(cfg) -> dict:
    from alignedserve.cluster.serve import status_snapshot

    return status_snapshot(cfg.redis_url, cfg.redis_prefix)


def _reference(tiny_dir, pools, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm = LLM(str(tiny_dir), dtype="float32", **pools)
    return [o.text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


async def _complete_all(cfg, prompts: list[str], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.http_port}",
                                 timeout=180) as client:
        async def one(prompt: str) -> dict:
            r = await client.post("/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()

        return await asyncio.gather(*(one(p) for p in prompts))


def _wait_for_stores(cfg, n: int, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        snap = _status(cfg)
        if len(snap["nodes"]) >= n or time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


def test_replicas_on_two_worker_nodes_serve_the_in_process_engines_greedy_outputs(
        nodes, tiny_dir, pools):
    import json
    import subprocess
    import sys

    cfg, cluster, workers = nodes
    snap = _wait_for_stores(cfg, 2)
    head = cluster.head_node.node_id
    replica_nodes = {rep["node"] for rep in snap["replicas"]}
    assert replica_nodes == {w.node_id for w in workers}  # one on each worker node
    assert {st["node"] for st in snap["nodes"]} == replica_nodes
    assert all(st["address"].startswith("127.0.0.1:") for st in snap["nodes"])
    info = httpx.get(f"http://127.0.0.1:{cfg.http_port}/v1/status", timeout=10).json()
    assert info["node"] == head  # the router is on neither replica's node
    shown = json.loads(subprocess.run(
        [sys.executable, "-m", "alignedserve.cluster.cli", "status", "--json", "--redis-url",
         cfg.redis_url], env={**os.environ, "ALIGNEDSERVE_REDIS_PREFIX": cfg.redis_prefix},
        capture_output=True, text=True, check=True).stdout)
    assert {n["node"]: len(n["replicas"]) for n in shown["nodes"]} == {
        w.node_id: 1 for w in workers}

    got = asyncio.run(_complete_all(cfg, PROMPTS * 2, 24))
    want = _reference(tiny_dir, pools, 24) * 2
    assert [g["choices"][0]["text"] for g in got] == want


def test_a_request_decoded_on_another_node_than_its_prefill_moves_its_kv_over_grpc(
        nodes, tiny_dir, pools):
    import redis

    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.nodes import cordon, uncordon

    cfg, _, workers = nodes
    r = redis.Redis.from_url(cfg.redis_url)
    keys = RedisKeys(cfg.redis_prefix)
    a, b = (w.node_id for w in workers)
    before = _status(cfg)
    served_a = next(st["bytes_served"] for st in before["nodes"] if st["node"] == a)
    cordon(r, keys, a, "decode")  # A only prefills ...
    cordon(r, keys, b, "prefill")  # ... B only decodes: every request's KV crosses
    time.sleep(1.5)  # the leader and the workers read cordons about once a second
    try:
        got = asyncio.run(_complete_all(cfg, PROMPTS, 24))
    finally:
        uncordon(r, keys, a)
        uncordon(r, keys, b)
    assert [g["choices"][0]["text"] for g in got] == _reference(tiny_dir, pools, 24)
    after = _status(cfg)
    pulls = after["cross_node_pulls"] - before["cross_node_pulls"]
    moved = after["cross_node_kv_bytes"] - before["cross_node_kv_bytes"]
    assert pulls == len(PROMPTS)
    # Each pull moved the prompt's KV blocks of the tiny model's shape.
    block_bytes, block = _block_bytes(cfg, tiny_dir)
    blocks = sum(-(-g["usage"]["prompt_tokens"] // block) for g in got)
    assert moved == blocks * block_bytes
    deadline = time.monotonic() + 5  # store stats are republished every second
    while True:
        st = next(st for st in _status(cfg)["nodes"] if st["node"] == a)
        if st["bytes_served"] - served_a >= moved or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["bytes_served"] - served_a == moved  # A's store served exactly that, over gRPC


def _block_bytes(cfg, tiny_dir) -> tuple[int, int]:
    """(bytes, tokens) of one KV block of the served tiny model."""
    from alignedserve.deployments.limits import serving_limits

    limits = serving_limits(cfg, str(tiny_dir))
    return limits.pools.block_bytes, limits.pools.block_shape[2]


def test_killing_a_worker_node_mid_load_loses_no_accepted_request(nodes, tiny_dir, pools):
    """Runs last: it removes worker node B (its raylet and every process on it, its KV
    store included) while 12 greedy streams run. Each completes with the undisturbed text:
    requests held on B resume on A by recompute."""
    import json

    cfg, cluster, workers = nodes
    # Long enough that B still holds streams when its processes die, on a fast host too
    # (at 80 tokens they could all finish first: 1 failure in 3 runs on an AVX-512 host).
    max_tokens = 200
    want = _reference(tiny_dir, pools, max_tokens)
    prompts = PROMPTS * 2
    started = asyncio.Event()

    async def stream(client: httpx.AsyncClient, prompt: str) -> tuple[str, list]:
        text, errors = [], []
        async with client.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    errors.append(msg["error"])
                    continue
                text.append(msg["choices"][0]["text"])
                if len(text) == 5:
                    started.set()
        return "".join(text), errors

    async def run() -> list[tuple[str, list]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.http_port}",
                                     timeout=180) as client:
            tasks = [asyncio.create_task(stream(client, p)) for p in prompts]
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.remove_node, workers[1], False)
            return await asyncio.wait_for(asyncio.gather(*tasks), 240)

    results = asyncio.run(run())
    assert [e for _, e in results if e] == []
    assert [t for t, _ in results] == want * 2
    snap = _status(cfg)
    assert snap["resumed_requests"] >= 1  # B held some of them when it died
    # B's processes are gone with it (the replica's may take a moment to notice its raylet
    # died); A's replica keeps publishing.
    import psutil

    deadline = time.monotonic() + 30
    while True:
        snap = _status(cfg)
        fresh = {rep["node"] for rep in snap["replicas"] if rep["age_s"] < 3}
        if fresh == {workers[0].node_id} or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert fresh == {workers[0].node_id}
    b_pids = [pid for rep in snap["replicas"] if rep["node"] == workers[1].node_id
              for pid in rep["pids"]]
    assert b_pids and not any(psutil.pid_exists(p) for p in b_pids)
