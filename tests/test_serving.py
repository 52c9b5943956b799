"""The whole cluster end to end: real Redis, real Ray Serve, HTTP and gRPC on loopback.

One deployment serves every test here: 2 compute replicas, each with its prefetch worker,
1 router (the scheduler leader), the node's KV store, on the tiny random model. The replicas
run prefill themselves (`prefill_on: replica`, what `auto` picks for one CPU replica); the
prefetch workers' prefill is served end to end by test_chaos and test_multinode. The official
`openai` client talks HTTP; the generated stub talks gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from alignedserve import LLM, SamplingParams
from alignedserve.ports import free_port

pytestmark = pytest.mark.slow

PROMPTS = ["the quick brown fox", "a b c d e f g h i j k l m n o p", "hello",
           " ".join(["word"] * 90)]


@pytest.fixture(scope="module")
def cluster(tiny_dir, redis_url):
    import ray
    from ray import serve

    from alignedserve.config import ServeConfig
    from alignedserve.deployments import app as cli_serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for attempt in range(3):
            # A probed free port can be taken by another process before Serve's proxy binds
            # it: then probe again (with a fresh queue prefix for the fresh deployment).
            cfg = ServeConfig(
                model=str(tiny_dir), served_model_name="tiny", http_port=free_port(),
                grpc_port=free_port(), redis_url=redis_url,
                redis_prefix=f"t{uuid.uuid4().hex[:6]}:", start_redis=False,
                num_replicas=2, replica_cpus=0.25, worker_cpus=0.25, host_kv_gib=0.05,
                drain_timeout_s=5, replica_timeout_s=6, prefill_on="replica",
                engine={"kv_cache_gib": 0.02, "min_batch": 4, "max_num_seqs": 32,
                        "dtype": "float32"},
            )
            try:
                cli_serve.start(cfg, str(tiny_dir))
                break
            except Exception as e:
                serve.shutdown()
                if "Failed to bind" not in str(e) or attempt == 2:
                    raise
        yield cfg
        cli_serve.stop()
    finally:
        ray.shutdown()


def _base(cfg) -> str:
    return f"http://127.0.0.1:{cfg.http_port}"


def _client(cfg):
    import openai

    return openai.OpenAI(base_url=f"{_base(cfg)}/v1", api_key="none", max_retries=0,
                         timeout=120)


def _status(cfg) -> dict:
    from alignedserve.cluster.serve import status_snapshot

    return status_snapshot(cfg.redis_url, cfg.redis_prefix)


def _wait_idle(cfg, timeout_s: float = 30) -> dict:
    """The cluster holds no request and no KV anywhere (bounded poll)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        snap = _status(cfg)
        busy = sum(rep["requests"] for rep in snap["replicas"]) + snap["decode_index"] + \
            snap["prefill_queue"]
        used = _store_used(ray)
        if (busy == 0 and used == 0) or time.monotonic() > deadline:
            return {"busy": busy, "store_used_blocks": used, **snap}
        time.sleep(0.2)


def _store_used(ray) -> int:
    node = ray.get_runtime_context().get_node_id()
    store = ray.get_actor(f"alignedserve-kvstore-{node}")
    return ray.get(store.stats.remote()).used_blocks


def test_greedy_completions_equal_the_in_process_engine(cluster, tiny_dir, pools):
    client = _client(cluster)
    llm = LLM(str(tiny_dir), dtype="float32", policy="aligned", **pools)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, ref in zip(PROMPTS, want, strict=True):
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == ref.text
        assert got.usage.completion_tokens == len(ref.token_ids) == 24
        assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert got.choices[0].finish_reason == "length"


def test_streamed_chat_concatenates_to_the_non_streamed_text(cluster):
    client = _client(cluster)
    msgs = [{"role": "user", "content": "tell me about batching"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30,
                                          temperature=0, stop=["e t"])
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=30,
                                            temperature=0, stop=["e t"], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason


def test_64_concurrent_mixed_length_requests_all_complete_on_both_replicas(cluster):
    import openai

    async def run() -> list:
        client = openai.AsyncOpenAI(base_url=f"{_base(cluster)}/v1", api_key="none",
                                    max_retries=0, timeout=300)
        calls = [client.completions.create(
            model="tiny", prompt=" ".join(["tok"] * (2 + (i * 37) % 150)),
            max_tokens=4 + (i * 13) % 40, temperature=0, extra_body={"ignore_eos": True})
            for i in range(64)]
        return await asyncio.gather(*calls)

    async def watch(done: asyncio.Event) -> dict[str, int]:
        """The most requests each replica held at once while the load ran."""
        most: dict[str, int] = {}
        while not done.is_set():
            for rep in (await asyncio.to_thread(_status, cluster))["replicas"]:
                most[rep["replica"]] = max(most.get(rep["replica"], 0), rep["requests"])
            await asyncio.sleep(0.1)
        return most

    async def both() -> tuple[list, dict[str, int]]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch(done))
        outs = await run()
        done.set()
        return outs, await watcher

    outs, most = asyncio.run(both())
    assert [o.usage.completion_tokens for o in outs] == [4 + (i * 13) % 40 for i in range(64)]
    assert len(most) == 2 and all(n > 0 for n in most.values()), most  # both took work


def test_client_disconnect_frees_kv_everywhere(cluster):
    import redis

    r = redis.Redis.from_url(cluster.redis_url)
    aborted_before = r.scard(f"{cluster.redis_prefix}aborted")
    body = {"model": "tiny", "prompt": "a long one", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{_base(cluster)}/v1/completions",
                         json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 6:
                    break  # leave mid-stream: the connection closes
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: give up waiting
            http.post(f"{_base(cluster)}/v1/completions", json={**body, "max_tokens": 2000},
                      timeout=1.5)
    idle = _wait_idle(cluster)
    assert idle["busy"] == 0 and idle["store_used_blocks"] == 0, idle
    # Both requests were aborted by the router (not merely finished in the meantime).
    assert r.scard(f"{cluster.redis_prefix}aborted") - aborted_before == 2


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny"}, 400, None),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**7}, 400, None),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, None),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 1.3}, 400, None),
])
def test_bad_requests_get_openai_errors(cluster, body, status, param):
    resp = httpx.post(f"{_base(cluster)}/v1/completions", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_malformed_json_is_a_400(cluster):
    resp = httpx.post(f"{_base(cluster)}/v1/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400 and "error" in resp.json()


def test_grpc_generate_abort_health_and_info(cluster, tiny_dir, pools):
    import grpc

    from alignedserve.deployments.protos import alignedserve_pb2 as pb
    from alignedserve.deployments.protos import alignedserve_pb2_grpc as pbg

    llm = LLM(str(tiny_dir), dtype="float32", policy="aligned", **pools)
    ref = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                  ignore_eos=True), use_tqdm=False)[0]
    meta = (("application", "alignedserve"),)
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as ch:
        stub = pbg.AlignedServeStub(ch)
        req = pb.GenerateRequest(request_id="g1", text=PROMPTS[0], sampling=pb.SamplingParams(
            max_tokens=12, temperature=0, ignore_eos=True))
        msgs = list(stub.Generate(req, metadata=meta, timeout=120))
        ids = [t for m in msgs if m.HasField("chunk") for t in m.chunk.token_ids]
        assert ids == ref.token_ids
        assert "".join(m.chunk.text for m in msgs if m.HasField("chunk")) == ref.text
        done = msgs[-1].complete
        assert done.finish_reason == "length" and done.usage.completion_tokens == 12
        assert stub.Health(pb.HealthRequest(), metadata=meta, timeout=30) is not None
        info = stub.ServerInfo(pb.ServerInfoRequest(), metadata=meta, timeout=30)
        assert info.model == "tiny"
        stub.Abort(pb.AbortRequest(request_id="unknown"), metadata=meta, timeout=30)
        bad_call = stub.Generate(pb.GenerateRequest(text="x", sampling=pb.SamplingParams(
            max_tokens=10**6)), metadata=meta, timeout=30)
        bad = []
        with pytest.raises(grpc.RpcError) as err:
            bad.extend(bad_call)  # one Error message, then the call's status
        assert len(bad) == 1 and bad[0].error.code == 400
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A cancelled call (the client went away) aborts the request and frees its KV.
        call = stub.Generate(pb.GenerateRequest(request_id="g2", text="cancel me",
                                                sampling=pb.SamplingParams(
                                                    max_tokens=400, ignore_eos=True)),
                             metadata=meta, timeout=120)
        next(call), next(call)
        call.cancel()
    idle = _wait_idle(cluster)
    assert idle["busy"] == 0 and idle["store_used_blocks"] == 0, idle


def test_metrics_and_status(cluster):
    client = _client(cluster)
    client.completions.create(model="tiny", prompt="metrics please", max_tokens=5)
    deadline = time.monotonic() + 40
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{_base(cluster)}/metrics", timeout=30).text
        if "time_to_first_token_seconds" in text and "batch_switches" in text:
            break
        time.sleep(1)
    assert "alignedserve" in text and "time_to_first_token_seconds" in text
    snap = _status(cluster)
    assert snap["leader_held"] and json.dumps(snap)
    assert [rep["prefill"] for rep in snap["replicas"]] == ["replica", "replica"]
    assert httpx.get(f"{_base(cluster)}/health", timeout=10).status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def _redis_calls(r) -> int:
    return sum(v["calls"] for v in r.info("commandstats").values())


def test_an_idle_cluster_waits_on_redis_instead_of_polling_it(cluster):
    """Idle compute replicas wait on the work channel and the leader on its wake list; what
    remains is each replica's heartbeat (its state, 10 times a second) and slower upkeep.
    Polling the inbox and the prefill queue every 20 ms, as replicas once did, and a leader
    woken by every heartbeat, made over 400 Redis calls a second on this cluster."""
    import redis

    assert _wait_idle(cluster)["busy"] == 0
    r = redis.Redis.from_url(cluster.redis_url)
    time.sleep(1.0)  # the last request's wake-ups have passed
    before = _redis_calls(r)
    time.sleep(4.0)
    per_s = (_redis_calls(r) - before) / 4.0
    assert per_s < 120, f"{per_s:.0f} Redis calls a second while idle"
    # and it still wakes: a request now is served
    out = _client(cluster).completions.create(model="tiny", prompt="hello", max_tokens=3,
                                              temperature=0)
    assert out.usage.completion_tokens == 3


def test_a_request_survives_the_death_of_every_replica(cluster, tiny_dir, pools):
    """Runs last: it kills both compute replicas (and so their prefetch workers) while a
    greedy request streams. The request resumes on the replicas Serve starts instead, and
    the client's stream, token by token, equals an undisturbed run."""
    import ray
    import redis

    r = redis.Redis.from_url(cluster.redis_url)
    body = {"model": "tiny", "prompt": "resumed", "max_tokens": 160, "temperature": 0,
            "ignore_eos": True, "stream": True, "logprobs": 1}
    ref = LLM(str(tiny_dir), dtype="float32", **pools).generate([body["prompt"]], SamplingParams(
        max_tokens=160, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    text, errors, killed = [], [], False
    with httpx.stream("POST", f"{_base(cluster)}/v1/completions", json=body,
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                errors.append(msg["error"])
                continue
            text.append(msg["choices"][0]["text"])
            if len(text) == 6 and not killed:  # held by a replica: kill every replica
                assert r.hget(f"{cluster.redis_prefix}req:{msg['id']}", "holder")
                for a in ray.util.list_named_actors(all_namespaces=True):
                    if "ComputeReplica" in a["name"]:
                        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]))
                killed = True
    assert killed and not errors, errors
    assert "".join(text) == ref.text
    assert _status(cluster)["resumed_requests"] >= 1


def test_an_app_too_big_for_the_local_ray_is_refused_not_left_pending(cluster):
    """Serve would wait forever for replicas it cannot place (a benchmark hung 25 minutes
    on 2 pairs x 1 CPU + the router on 2 CPUs): on a Ray it started, `start` says so."""
    from alignedserve.deployments.app import check_fits

    check_fits(cluster)  # the running app: 2 x (0.25 + 0.25) + 0.1 of 2 CPUs
    with pytest.raises(ValueError, match=r"= 2.1 Ray CPUs, but this machine's Ray has 2"):
        check_fits(cluster.model_copy(update={"replica_cpus": 0.5, "worker_cpus": 0.5}))


def test_free_ports_are_outside_the_ranges_ray_and_the_kernel_hand_out():
    """A server (or Serve's proxy, under direct ingress) binds the port later; an ephemeral
    port, or one of Ray's worker ports, could meanwhile go to a process Ray starts."""
    import socket
    from pathlib import Path

    from alignedserve.ports import free_port

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(5):
        port = free_port()
        assert 20_000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: binds


def test_ingress_auto_is_direct_with_one_router_and_direct_refuses_two():
    """`auto` serves through the router itself when there is one (the CLI test checks who
    listens), through Serve's proxy when there are more; `direct` cannot take two routers on
    one port, and says so when the config is read."""
    from alignedserve.config import ServeConfig
    from alignedserve.deployments.app import ray_serve_env

    one = ServeConfig(http_port=8100, grpc_port=9100)
    assert one.direct_ingress and not one.model_copy(update={"num_routers": 2}).direct_ingress
    env = ray_serve_env(one)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve's allocator hands out range(min, max): the configured port and nothing else.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"],
            env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("8100", "8101")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"],
            env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == ("9100", "9101")
    no_grpc = ray_serve_env(one.model_copy(update={"grpc_port": 0}))
    assert not any("GRPC" in k for k in no_grpc)  # Serve allocates no gRPC port then
    assert ray_serve_env(ServeConfig(ingress="proxy")) == {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    with pytest.raises(ValueError, match="num_routers must be 1"):
        ServeConfig(ingress="direct", num_routers=2)
