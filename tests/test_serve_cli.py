"""`alignedserve serve` as users run it: a subprocess that starts its own Redis and Ray,
answers on loopback, and on SIGTERM drains an in-flight stream before exiting."""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from cli_server import start_cli_server

from alignedserve.deployments.app import LOG_MONITOR_ENV, SERVE_LOOP_ENV, SERVE_LOOP_S

pytestmark = pytest.mark.slow


def test_serve_cli_answers_and_drains_on_sigterm(tiny_dir, tmp_path):
    # compute_nice 16: above Ray's 15, so it needs no privilege
    server = start_cli_server(tiny_dir, tmp_path, "cli-test:",
                              env={"ALIGNEDSERVE_DRAIN_TIMEOUT_S": "30",
                                   "ALIGNEDSERVE_COMPUTE_NICE": "16"})
    proc, base = server.proc, server.base
    try:
        from alignedserve.cluster.serve import status_snapshot

        # One CPU replica: prefill_on=auto has the replica prefill (no worker prefill).
        snap = status_snapshot(server.redis_url, "cli-test:")
        assert [rep["prefill"] for rep in snap["replicas"]] == ["replica"]
        # It listens on loopback only: HTTP, gRPC (Serve's proxy would take [::]) and Redis.
        ports = {int(a.rsplit(":", 1)[1].split("/")[0]) for a in
                 (server.base, server.grpc, server.redis_url)}
        listening = [c.laddr for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
        assert {a.port for a in listening} == ports, listening
        assert all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening), listening
        # One router, ingress=auto: the router replica itself listens on the HTTP and gRPC
        # ports (Serve's direct ingress), not Serve's proxy.
        api = {int(a.rsplit(":", 1)[1].split("/")[0]) for a in (server.base, server.grpc)}
        owners = {" ".join(psutil.Process(c.pid).cmdline()) for c in
                  psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                  and c.laddr.port in api}
        assert owners and all("ServeReplica:alignedserve:Router" in o for o in owners), owners
        # compute_nice reaches every thread of the router (admission and streaming at the
        # model steps' priority, not Ray's 15)
        (router,) = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if "ServeReplica:alignedserve:Router" in " ".join(p.cmdline())]
        nices = {psutil.Process(t.id).nice() for t in router.threads()}
        assert nices == {16}, nices
        _abandoned_calls_are_aborted(server, "cli-test:")
        # The Ray it started runs Serve's controller loop at SERVE_LOOP_S (less CPU beside
        # the model on a small node).
        ctl = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "ServeController" in " ".join(p.cmdline())]
        assert ctl and all(p.environ().get(SERVE_LOOP_ENV) == SERVE_LOOP_S for p in ctl), ctl
        # and its log monitor looks for new log files every 5 s, not 10 times a second
        mon = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "log_monitor.py" in " ".join(p.cmdline())]
        assert mon and all(LOG_MONITOR_ENV.items() <= p.environ().items() for p in mon), mon
        body = {"model": "tiny", "prompt": "drain me", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}
        chunks, reason = 0, None
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                msg = json.loads(line[6:])
                assert "error" not in msg, msg
                chunks += 1
                if chunks == 3:
                    proc.send_signal(signal.SIGTERM)  # drain starts while we stream
                reason = msg["choices"][0]["finish_reason"] or reason
        assert reason == "length"  # the in-flight request finished during the drain
        assert proc.wait(timeout=120) == 0
        out = server.output()
        assert "OpenAI HTTP" in out and "draining" in out
    finally:
        server.kill()


def _abandoned_calls_are_aborted(server, prefix: str) -> None:
    """Through the router's own servers (direct ingress), as through Serve's proxy
    (test_grpc_api, test_serving): a cancelled gRPC call and a closed HTTP stream abort
    their request (Redis remembers aborted ids for an hour)."""
    import time

    import grpc
    import redis

    from alignedserve.deployments.protos import alignedserve_pb2 as pb
    from alignedserve.deployments.protos import alignedserve_pb2_grpc as pbg
    from alignedserve.global_queue.keys import RedisKeys

    r, aborted = redis.Redis.from_url(server.redis_url), RedisKeys(prefix).aborted

    def is_aborted(rid: str) -> bool:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not r.sismember(aborted, rid):
            time.sleep(0.1)
        return bool(r.sismember(aborted, rid))

    with grpc.insecure_channel(server.grpc) as ch:
        call = pbg.AlignedServeStub(ch).Generate(pb.GenerateRequest(
            request_id="cli-cancel", text="cancel me", sampling=pb.SamplingParams(
                max_tokens=120, ignore_eos=True)), timeout=60)
        next(call), next(call)
        call.cancel()
    body = {"model": "tiny", "prompt": "leave me", "max_tokens": 120, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as resp:
        lines = (line for line in resp.iter_lines() if line.startswith("data: {"))
        rid = json.loads(next(lines)[6:])["id"]
        next(lines)
    assert is_aborted("cli-cancel") and is_aborted(rid)


def test_a_server_over_the_redis_of_an_uncleanly_stopped_one_serves_everything(
        tiny_dir, tmp_path, redis_url):
    """What an unclean stop leaves (a replica registration, records, queued ids, a leader
    lock) must not poison the next server on the same Redis: it clears them and serves."""
    import time

    import redis

    from alignedserve.global_queue.events import TokenEvent, publish
    from alignedserve.global_queue.index import RedisQueueIndex
    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.records import (
        ReplicaState,
        RequestRecord,
        publish_state,
        put_record,
    )
    from alignedserve.scheduling.sampling_params import SamplingParams

    keys = RedisKeys("unclean:")
    r = redis.Redis.from_url(redis_url)
    publish_state(r, keys, ReplicaState("r-gone", time.time() - 120, free=256))
    pipe = r.pipeline()
    for i in range(5):
        rec = RequestRecord(f"old{i}", (5, 6, 7), SamplingParams(max_tokens=4), 1.0,
                            holder="r-gone")
        put_record(pipe, keys, rec)
        publish(pipe, keys, rec.request_id, TokenEvent((9,), 1))
        pipe.rpush(keys.prefill if i % 2 else keys.inbox("r-gone"), rec.request_id)
    pipe.set(keys.leader, "dead-router-token")
    pipe.execute()
    RedisQueueIndex(r, keys).put("old9", 12)
    server = start_cli_server(tiny_dir, tmp_path, keys.prefix, redis_url=redis_url)
    try:
        body = {"model": "tiny", "prompt": "after an unclean stop", "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}

        def one(_: int) -> httpx.Response:
            return httpx.post(f"{server.base}/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(16) as pool:  # 64 plain completions, 16 at a time
            responses = list(pool.map(one, range(64)))
        for resp in responses:
            assert resp.status_code == 200, resp.text
            assert resp.json()["usage"]["completion_tokens"] == 6
        assert not r.hexists(keys.replicas, "r-gone")
        assert not any(r.exists(keys.req(f"old{i}")) for i in range(5))
        assert server.stop() == 0
    finally:
        server.kill()


def test_a_lone_router_killed_comes_back_on_its_port(tiny_dir, tmp_path):
    """Direct ingress: the one router owns the ports. Killed, Serve replaces it, and the
    new one gets the same ports back (no quarantine of the old one's), so the server
    answers there again."""
    import time

    def routers() -> list[psutil.Process]:
        return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "ServeReplica:alignedserve:Router" in " ".join(p.cmdline())]

    server = start_cli_server(tiny_dir, tmp_path, "cli-kill:")
    try:
        (old,) = routers()
        old.kill()
        old.wait(timeout=30)
        body = {"model": "tiny", "prompt": "back again", "max_tokens": 4}
        deadline, resp = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:
                resp = httpx.post(f"{server.base}/v1/completions", json=body, timeout=30)
                if resp.status_code == 200:
                    break
            except httpx.TransportError:  # refused until the new router listens
                pass
            time.sleep(1)
        assert resp is not None and resp.status_code == 200, resp
        assert resp.json()["usage"]["completion_tokens"] == 4
        (new,) = routers()
        assert new.pid != old.pid
        grpc_port = int(server.grpc.rsplit(":", 1)[1])
        assert any(c.laddr.port == grpc_port and c.status == psutil.CONN_LISTEN
                   for c in new.net_connections("tcp"))
        assert server.stop() == 0
    finally:
        server.kill()


def test_the_banner_names_the_grpc_address_or_says_grpc_is_off(capsys):
    from alignedserve.cluster.serve import _print_usage
    from alignedserve.config import ServeConfig

    _print_usage(ServeConfig(grpc_port=9123))
    assert "gRPC:        127.0.0.1:9123 (service alignedserve.v1.AlignedServe" in (
        capsys.readouterr().out)
    _print_usage(ServeConfig(grpc_port=0))
    out = capsys.readouterr().out
    assert "gRPC:        off" in out and ":0 " not in out
