"""Serving overhead: the same workload through the in-process engine and through the whole
Serve path (HTTP -> router -> Redis -> prefetch worker -> compute replica -> Redis stream
-> SSE), side by side in one run on one machine.

The Serve client streams every request (`/v1/completions` with token-id prompts,
`ignore_eos`, greedy) from an asyncio loop in this process, timing each SSE chunk: TTFT is
the first chunk, ITL the gaps between chunks, TPOT (last - first) / (tokens - 1). Offline
mode submits everything at t=0; `rate` submits on a Poisson schedule.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from alignedserve.loadgen.report import RequestRecord, SystemRun, plot_png, summarize, write_json
from alignedserve.loadgen.workloads import WorkloadRequest, make_workload
from alignedserve.ports import free_port


@dataclass(frozen=True)
class ServeBenchConfig:
    model: str  # model folder
    label: str  # model name for titles
    workload: str = "mix95"
    num_requests: int = 128
    rate: float | None = None  # Poisson req/s; None = offline (all at t=0)
    seed: int = 0
    len_scale: float = 4.0
    num_replicas: int = 1
    kv_cache_gib: float = 2.0
    host_kv_gib: float = 4.0
    threads: int = 2  # in-process engine threads
    replica_threads: int = 1  # torch threads of each compute replica
    worker_threads: int = 1  # torch threads of each prefetch worker
    compute_nice: int | None = 0  # ServeConfig.compute_nice, as `bench peers-serve` runs it
    out_dir: str | None = None
    progress: bool = True
    command: str = ""


async def _one(http: httpx.AsyncClient, url: str, model: str, req: WorkloadRequest,
               t0: float, itl: list[float]) -> RequestRecord:
    await asyncio.sleep(max(0.0, req.arrival_s - (time.monotonic() - t0)))
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    times: list[float] = []
    usage = 0
    try:
        async with http.stream("POST", url, json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("choices"):
                    times.append(time.monotonic() - t0)
                if msg.get("usage"):
                    usage = msg["usage"]["completion_tokens"]
    except httpx.HTTPError:
        usage = 0  # counted as failed (ok=False) below; the run goes on
    itl.extend(np.diff(times).tolist())
    done = time.monotonic() - t0
    return RequestRecord(len(req.prompt_token_ids), req.max_tokens, usage, req.arrival_s,
                         times[0] if times else None, times[-1] if times else None, done,
                         usage == req.max_tokens, ())


async def _drive(base: str, model: str, requests: list[WorkloadRequest], progress: bool,
                 itl: list[float]) -> tuple[list[RequestRecord], float]:
    limits = httpx.Limits(max_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as http:
        t0 = time.monotonic()
        bar = tqdm(total=len(requests), desc="serve", unit="req", disable=not progress)

        async def tracked(r: WorkloadRequest) -> RequestRecord:
            rec = await _one(http, f"{base}/v1/completions", model, r, t0, itl)
            bar.update(1)
            return rec

        records = await asyncio.gather(*(tracked(r) for r in requests))
        bar.close()
        return list(records), time.monotonic() - t0


_PAIR_CPUS = 1.8  # of the benchmark Ray's 2 CPUs, what the compute pairs reserve


def run_serve_path(cfg: ServeBenchConfig, requests: list[WorkloadRequest]) -> tuple[SystemRun,
                                                                                     list[float]]:
    import ray

    from alignedserve.config import ServeConfig
    from alignedserve.deployments import app
    from alignedserve.global_queue.redis_server import LocalRedis

    url = f"redis://127.0.0.1:{free_port()}/0"
    scfg = ServeConfig(
        model=cfg.model, served_model_name=cfg.label, http_port=free_port(), grpc_port=0,
        redis_url=url, redis_prefix=f"bench-{uuid.uuid4().hex[:6]}:", start_redis=False,
        num_replicas=cfg.num_replicas, host_kv_gib=cfg.host_kv_gib,
        # Reservations that fit the 2 Ray CPUs below beside the router, however many pairs.
        replica_cpus=_PAIR_CPUS / 2 / cfg.num_replicas,
        worker_cpus=_PAIR_CPUS / 2 / cfg.num_replicas, replica_threads=cfg.replica_threads,
        worker_threads=cfg.worker_threads, compute_nice=cfg.compute_nice,
        engine={"kv_cache_gib": cfg.kv_cache_gib},
    )
    itl: list[float] = []
    with LocalRedis(url):
        # The Ray `alignedserve serve` starts (direct ingress, its dashboard and settings), so
        # the serve path measured is the one users run.
        direct = app.init_ray(scfg)
        try:
            app.start(scfg, cfg.model, direct_ingress=direct)
            base = f"http://127.0.0.1:{scfg.http_port}"
            warm = [WorkloadRequest(list(range(32, 40)), 4, 0.0)]
            asyncio.run(_drive(base, cfg.label, warm, False, []))
            records, wall = asyncio.run(_drive(base, cfg.label, requests, cfg.progress, itl))
            app.stop()
        finally:
            ray.shutdown()
    run = SystemRun(name="serve", kind="engine", wall_s=wall, requests=tuple(records),
                    decode_tokens=0, decode_s=None, iteration_s=(), padding_pct=None,
                    batch_change_rate=None,
                    notes=f"Ray Serve path, {cfg.num_replicas} compute replica(s) + prefetch "
                    "worker(s), aligned policy, SSE streaming client in the same process")
    return run, itl


def run_in_process(cfg: ServeBenchConfig, requests: list[WorkloadRequest]) -> SystemRun:
    from alignedserve.engine.config import EngineConfig
    from alignedserve.engine.llm_engine import LLMEngine
    from alignedserve.loadgen.bench_offline import run_engine

    engine = LLMEngine(EngineConfig(model=cfg.model, policy="aligned", num_threads=cfg.threads,
                                    kv_cache_gib=cfg.kv_cache_gib, host_kv_gib=cfg.host_kv_gib),
                     record_stats=True)
    run = run_engine(engine, "aligned", requests, cfg.progress)
    return SystemRun(**{**run.__dict__, "name": "in-process", "decode_s": None,
                        "notes": "in-process LLMEngine, aligned policy, same knobs"})


def run_serve_bench(cfg: ServeBenchConfig) -> dict:
    from alignedserve.engine.config import ModelConfig

    vocab = ModelConfig.from_pretrained(cfg.model).vocab_size
    mode = "online" if cfg.rate else "offline"
    requests = make_workload(cfg.workload, cfg.num_requests, vocab, seed=cfg.seed,
                             len_scale=cfg.len_scale, mode=mode, rate=cfg.rate)
    base_run = run_in_process(cfg, requests)
    serve_run, itl = run_serve_path(cfg, requests)
    sums = {r.name: summarize(r) for r in (base_run, serve_run)}
    sums["serve"]["itl_s"] = {k: float(np.percentile(itl, q)) for k, q in
                              (("p50", 50), ("p90", 90), ("p99", 99))} if itl else None
    ratio = sums["serve"]["output_tps"] / sums["in-process"]["output_tps"]
    out = Path(cfg.out_dir or f"bench-results/serve-{cfg.label}-{cfg.workload}"
               f"{'-rate' + str(cfg.rate) if cfg.rate else ''}")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": cfg.command, "config": cfg.__dict__, "summaries": sums,
               "serve_over_in_process_output_tps": ratio, "overhead_pct": 100 * (1 - ratio)}
    write_json(out / "results.json", payload)
    plot_png(out / "results.png", sums, [base_run, serve_run],
             f"{cfg.label} / {cfg.workload} / {cfg.num_requests} req: Serve path vs in-process")
    return payload


def print_summary(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("system", "output tok/s", "TTFT p50/p99 s", "TPOT p50/p99 ms",
                  "ITL p50/p99 ms", "e2e p99 s", "completed")
    for name, s in payload["summaries"].items():
        itl = s.get("itl_s")
        table.add_row(
            name, f"{s['output_tps']:.1f}",
            f"{s['ttft_s']['p50']:.2f} / {s['ttft_s']['p99']:.2f}",
            f"{s['tpot_s']['p50'] * 1e3:.0f} / {s['tpot_s']['p99'] * 1e3:.0f}",
            "-" if not itl else f"{itl['p50'] * 1e3:.0f} / {itl['p99'] * 1e3:.0f}",
            f"{s['e2e_s']['p99']:.1f}", f"{s['completed']}/{s['requests']}")
    Console().print(table)
    print(f"Serve / in-process output tok/s: {payload['serve_over_in_process_output_tps']:.3f} "
          f"(overhead {payload['overhead_pct']:.1f}%)")
