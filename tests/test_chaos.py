"""The fault suite: one real `alignedserve serve` (its own Redis and local Ray; 2 compute
replicas, each with its prefetch worker; 2 routers) while greedy streams run, and real
`kill -9`s of its processes, a burst, and SIGTERM to its whole process group.

Each scenario checks what users care about: no accepted request lost, every completed
output identical to the fault-free run, the service back afterwards, no shared memory left
by the dead. Measured times go to a report (`make chaos` writes it into BENCHMARKS.md's
RELIABILITY table); they are not asserted beyond a hang bound, as timings on these noisy
2-core machines prove nothing in a test.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from chaos_load import N_TOKENS, Load, Stream
from cli_server import CliServer, start_cli_server

from alignedserve.kv_store.shm_arena import arena_owners

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PREFIX = "chaos:"
PROMPTS = [f"chaos {i}: " + "lorem ipsum " * (i % 6 * 4) for i in range(24)]
DRAIN_S = 10.0
MAX_QUEUED = 16
REPORT: dict[str, dict] = {}


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_cli_server(
        tiny_dir, tmp_path_factory.mktemp("chaos"), PREFIX, "--num-replicas", "2",
        "--num-routers", "2", new_session=True,
        config=(f"replica_cpus: 0.25\nworker_cpus: 0.25\ndrain_timeout_s: {DRAIN_S}\n"
                f"max_queued_requests: {MAX_QUEUED}\nreplica_timeout_s: 20\n"
                "replica_inflight: 8\n"
                "engine:\n  kv_cache_gib: 0.02\n  min_batch: 4\n  dtype: float32\n"))
    yield srv
    if srv.proc.poll() is None:
        os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
    out = os.environ.get("ALIGNEDSERVE_CHAOS_REPORT")
    if out and REPORT:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(REPORT, indent=2))


@pytest.fixture(scope="module")
def reference(server, tiny_dir) -> dict[str, str]:
    """The fault-free outputs, from the same server; they are transformers' greedy
    outputs (so a fault that corrupted the reference itself cannot pass unseen)."""
    from hf_reference import hf_greedy

    from alignedserve.engine.tokenizer import load_tokenizer

    # Two replicas: prefill_on=auto leaves prefill to the prefetch workers, whose deaths
    # and their KV hand-offs these tests exercise.
    assert {rep["prefill"] for rep in _replicas(server)} == {"worker"}
    streams = Load(server.base, PROMPTS).finish()
    assert all(s.error is None and s.finish == "length" for s in streams), streams
    tok = load_tokenizer(tiny_dir)
    truth = hf_greedy(str(tiny_dir), tuple(tuple(tok(p).input_ids) for p in PROMPTS),
                      N_TOKENS, ignore_eos=True)
    wrong = [(s.prompt, s.rid, s.text, tok.decode(ids)) for s, ids in
             zip(streams, truth, strict=True) if s.text != tok.decode(ids)]
    assert not wrong, wrong
    return {s.prompt: s.text for s in streams}


def _redis(server: CliServer) -> redis.Redis:
    return redis.Redis.from_url(server.redis_url)


def _replicas(server: CliServer) -> list[dict]:
    from alignedserve.cluster.serve import status_snapshot

    snap = status_snapshot(server.redis_url, PREFIX)
    return [rep for rep in snap["replicas"] if rep["age_s"] < 1.0]


def _wait_replicas(server: CliServer, n: int = 2, timeout_s: float = 120) -> float:
    """Until `n` replicas publish fresh states (Serve replaced the dead); seconds waited."""
    t0 = time.monotonic()
    while len(_replicas(server)) < n:
        assert time.monotonic() - t0 < timeout_s, "the killed replica was not replaced"
        time.sleep(0.25)
    return time.monotonic() - t0


def _holders(server: CliServer, streams: list[Stream]) -> dict[str, str]:
    r = _redis(server)
    got = {}
    for s in streams:
        h = r.hget(f"{PREFIX}req:{s.rid}", "holder") if s.rid else None
        if h is not None:
            got[s.rid] = h.decode()
    return got


def _early_holders(server: CliServer, streams: list[Stream], timeout_s: float = 60
                   ) -> dict[str, str]:
    """Holders of the streams still in their first half, once there are some: a kill then
    always finds requests in flight on its victim, however fast the host runs them.
    (`wait_streaming` can return when most streams have already finished.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        early = [s for s in streams if s.finish is None and len(s.chunk_times) < N_TOKENS // 2]
        if holders := _holders(server, early):
            return holders
        assert time.monotonic() < deadline, "no request was in flight to kill its holder"
        time.sleep(0.01)


def _server_pids(server: CliServer) -> set[int]:
    proc = psutil.Process(server.proc.pid)
    return {proc.pid, *(c.pid for c in proc.children(recursive=True))}


def _dead_owner_arenas() -> list[str]:
    return [n for n, pid in arena_owners().items() if pid > 0 and not psutil.pid_exists(pid)]


def _check_outputs(streams: list[Stream], reference: dict[str, str]) -> dict[str, int]:
    lost = [s for s in streams if s.error is not None or s.finish != "length"]
    assert not lost, [(s.prompt, s.error, s.finish) for s in lost]
    differ = [(s.prompt, s.rid, s.text, reference[s.prompt]) for s in streams
              if s.text != reference[s.prompt]]
    assert not differ, differ
    return {"in_flight": len(streams), "lost": 0, "identical": len(streams)}


def _stalls(streams: list[Stream], rids: set[str], killed_at: float) -> list[float]:
    """For the requests the dead process held: the longest pause of each one's stream from
    the kill on (kill to first token, or between two tokens): how long its client waited
    for the request to resume. Requests that had finished by the kill are left out."""
    stalls = []
    for s in streams:
        after = [t for t in s.chunk_times if t > killed_at]
        if s.rid in rids and after:
            points = [killed_at, *after]
            stalls.append(max(b - a for a, b in itertools.pairwise(points)))
    return stalls


def _kill_pair_member(server, reference, which: int, name: str) -> None:
    """kill -9 the replica (which=0) or the prefetch worker (1) holding most requests."""
    load = Load(server.base, PROMPTS)
    load.wait_streaming()
    holders = _early_holders(server, load.streams)
    reps = {rep["replica"]: rep for rep in _replicas(server)}
    victim = max(reps, key=lambda r: sum(h == r for h in holders.values()))
    held = {rid for rid, h in holders.items() if h == victim}
    killed_at = time.monotonic()
    os.kill(reps[victim]["pids"][which], signal.SIGKILL)
    streams = load.finish()
    row = _check_outputs(streams, reference)
    gaps = _stalls(streams, held, killed_at)
    assert gaps, "the victim held no unfinished request"
    _wait_replicas(server)
    row.update(held_by_victim=len(held), longest_stall_s=round(max(gaps), 2),
               median_stall_s=round(statistics.median(gaps), 2),
               replaced_after_s=round(time.monotonic() - killed_at, 1))
    assert not _dead_owner_arenas()
    REPORT[name] = row


def test_compute_replica_kill_9(server, reference):
    _kill_pair_member(server, reference, 0, "compute replica kill -9")


def test_prefetch_worker_kill_9(server, reference):
    _kill_pair_member(server, reference, 1, "prefetch worker kill -9")


def test_redis_kill_9_and_restart(server, reference):
    port = f":{int(server.redis_url.rsplit(':', 1)[1].split('/')[0])}"  # its title: host:port
    (redis_proc,) = [p for p in psutil.process_iter(["name", "cmdline"])
                     if p.info["name"] == "redis-server"
                     and port in " ".join(p.info["cmdline"] or [])]
    load = Load(server.base, PROMPTS[:12])
    load.wait_streaming()
    killed_at = time.monotonic()
    redis_proc.kill()
    # New requests: 503 with Retry-After while it is down, served again once it is back.
    served_at, refused = None, 0
    body = {"model": "tiny", "prompt": "after redis", "max_tokens": 4, "temperature": 0}
    while served_at is None and time.monotonic() - killed_at < 60:
        resp = httpx.post(f"{server.base}/v1/completions", json=body, timeout=60)
        if resp.status_code == 200:
            served_at = time.monotonic()
        else:
            assert resp.status_code == 503 and "retry-after" in resp.headers, resp.text
            assert resp.json()["error"]["code"] == "queue_unavailable"
            refused += 1
            time.sleep(0.2)
    assert served_at is not None
    row = _check_outputs(load.finish(), reference)
    row.update(new_requests_refused_503=refused,
               new_requests_served_after_s=round(served_at - killed_at, 2))
    REPORT["redis-server kill -9"] = row


def test_router_kill_9(server, reference):
    routers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "ServeReplica:alignedserve:Router" in " ".join(p.cmdline())]
    assert len(routers) == 2, routers
    load = Load(server.base, PROMPTS)
    load.wait_streaming()
    r = _redis(server)
    before = {x.decode() for x in r.hkeys(f"{PREFIX}routers")}
    killed_at = time.monotonic()
    routers[0].kill()
    streams = load.finish()
    # Streams through the dead router end with an error (their connection died with it);
    # the others are untouched. None hangs, and none is silently cut short.
    failed = [s for s in streams if s.error is not None]
    ok = [s for s in streams if s.error is None]
    assert all(s.finish == "length" and s.text == reference[s.prompt] for s in ok)
    # The leader aborts the dead router's requests and frees their KV.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = {x.decode() for x in r.hkeys(f"{PREFIX}routers")}
        if len(before - left) == 1:
            break
        time.sleep(0.5)
    (dead,) = before - left
    assert not r.exists(f"{PREFIX}routed:{dead}")
    aborted = [s.rid for s in failed if s.rid and r.sismember(f"{PREFIX}aborted", s.rid)]
    REPORT["router kill -9"] = {
        "in_flight": len(streams), "lost": 0, "identical": len(ok),
        "failed_with_an_error": len(failed), "of_those_aborted_and_freed": len(aborted),
        "error_seen": failed[0].error if failed else None,
        "cleaned_up_after_s": round(time.monotonic() - killed_at, 1)}
    assert len(aborted) == len([s for s in failed if s.rid])
    # Serve replaces the router (until then the proxy may answer 503 itself).
    while r.hlen(f"{PREFIX}routers") < 2:
        assert time.monotonic() - killed_at < 120, "the router was not replaced"
        time.sleep(0.5)
    body = {"model": "tiny", "prompt": "after the router", "max_tokens": 4}
    assert httpx.post(f"{server.base}/v1/completions", json=body, timeout=60).status_code == 200


def test_a_10x_burst_is_refused_with_429_and_memory_stays_bounded(server):
    pids = _server_pids(server)

    def rss() -> dict[int, int]:
        got = {}
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                got[pid] = psutil.Process(pid).memory_info().rss
        return got

    before = rss()
    peak = dict(before)
    stop = threading.Event()
    r = _redis(server)
    depth = [0]

    def sample() -> None:
        while not stop.wait(0.1):
            for pid, v in rss().items():
                peak[pid] = max(peak.get(pid, 0), v)
            depth[0] = max(depth[0], r.llen(f"{PREFIX}prefill") + r.zcard(f"{PREFIX}decode"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    body = {"model": "tiny", "prompt": "burst " * 20, "max_tokens": 96, "temperature": 0,
            "ignore_eos": True}

    def one(_: int) -> httpx.Response:
        return httpx.post(f"{server.base}/v1/completions", json=body, timeout=120)

    # Prefill is cordoned during the burst, so the queue fills however fast this machine's
    # workers would have drained it (a backed-up server, which admission control is for);
    # the accepted requests complete once it is lifted.
    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.nodes import cordon, uncordon

    keys, nodes = RedisKeys(PREFIX), {rep["node"] for rep in _replicas(server)}
    for node in nodes:
        cordon(r, keys, node, "prefill")
    time.sleep(1.5)  # workers read cordons about once a second
    with ThreadPoolExecutor(10 * MAX_QUEUED) as pool:
        futures = [pool.submit(one, i) for i in range(10 * MAX_QUEUED)]
        try:
            deadline, done, still = time.monotonic() + 60, 0, 0.0
            while still < 2.0 and time.monotonic() < deadline:  # until refusals stop
                time.sleep(0.1)  # the refused return at once; the accepted wait
                now_done = sum(f.done() for f in futures)
                still = 0.0 if now_done != done or not done else still + 0.1
                done = now_done
        finally:
            for node in nodes:
                uncordon(r, keys, node)
        responses = [f.result() for f in futures]
    stop.set()
    sampler.join()
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, [r.text for r in responses if r.status_code not in
                                      (200, 429)][:3]
    refused = [r for r in responses if r.status_code == 429]
    # The queue filled and held its bound (the admission check may race a few concurrent
    # arrivals past it, never a burst's worth).
    assert depth[0] >= MAX_QUEUED
    assert codes.count(200) <= 2 * MAX_QUEUED, f"{codes.count(200)} accepted"
    assert all(float(r.headers["retry-after"]) > 0 for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 96 for r in responses
               if r.status_code == 200)
    growth = {pid: peak[pid] - before[pid] for pid in before}
    assert max(growth.values()) < 512 << 20, growth
    REPORT["10x burst"] = {
        "in_flight": len(codes), "lost": 0, "accepted_and_completed": codes.count(200),
        "refused_429": len(refused), "peak_queued": depth[0],
        "peak_rss_mib": round(max(peak.values()) / 2**20),
        "max_rss_growth_mib": round(max(growth.values()) / 2**20)}


def test_sigterm_to_the_process_group_mid_load_stops_everything(server):
    from alignedserve.global_queue.redis_server import ping

    pids = _server_pids(server)
    load = Load(server.base, PROMPTS[:8])
    load.wait_streaming()
    t0 = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)  # what docker stop and systemd do
    code = server.proc.wait(timeout=DRAIN_S + 10)
    took = time.monotonic() - t0
    streams = load.finish(timeout_s=60)
    deadline = time.monotonic() + 10
    while ping(server.redis_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ping(server.redis_url), "its redis-server is still running"
    left = [n for n, pid in arena_owners().items() if pid in pids]
    assert not left, left
    REPORT["SIGTERM to the process group"] = {
        "in_flight": len(streams), "finished": sum(s.finish == "length" for s in streams),
        "failed_with_an_error": sum(s.error is not None for s in streams),
        "exit_code": code, "exited_after_s": round(took, 1), "redis_stopped": True,
        "shm_left": 0}
