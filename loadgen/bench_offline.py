"""Offline benchmark: one seeded workload through every engine policy and every peer.

Every request arrives at t=0, decodes greedily with ignore_eos, and each system gets the very
same token-id prompts and output lengths, so ratios between systems are measured in one run.
Metric definitions are in `report.py`. Model loading and a short warm-up are outside every
timed region.
"""

from __future__ import annotations

import gc
import shlex
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from alignedserve.loadgen import report
from alignedserve.loadgen.report import RequestRecord, SystemRun
from alignedserve.loadgen.workloads import WorkloadRequest, make_workload

# vllm: vLLM's CPU build with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (its best setting here: every core
# runs the model); vllm-reserved: its default, one core kept for its scheduler process.
PEER_NAMES: tuple[str, ...] = ("hf-static", "hf-cb", "vllm", "vllm-reserved")
DEFAULT_PEERS: tuple[str, ...] = ("hf-static", "hf-cb")  # vllm needs `make bench-peers`


@dataclass(frozen=True)
class OfflineBenchConfig:
    """Everything one offline run depends on; written verbatim into the result JSON."""

    model: str  # HF-format model folder
    label: str | None = None  # model name in titles and the default out dir; default: folder
    workload: str = "mix95"
    num_requests: int = 64
    seed: int = 0  # workload seed (prompts, lengths)
    len_scale: float = 4.0  # WORKLOADS.md lengths are paper / 4; 1 = paper lengths
    dtype: str = "float32"  # "float32" | "bfloat16", engine and peers alike
    threads: int = 2  # torch intra-op threads
    policies: tuple[str, ...] = ("fcfs",)  # engine policies; the first is the baseline
    peers: tuple[str, ...] = DEFAULT_PEERS
    hf_batch_size: int = 8  # hf-static batch size
    block_size: int = 32  # KV block (engine) and page (hf-cb) size, tokens (the engine's)
    kv_cache_gib: float = 1.0  # KV pool of the engine and of hf-cb
    max_num_seqs: int = 64  # engine max_num_seqs, hf-cb max_requests_per_batch
    max_num_batched_tokens: int = 1024  # engine token budget, hf-cb max_batch_tokens
    aligned: tuple[tuple[str, float], ...] = ()  # EngineConfig overrides for policy "aligned"
    rate: float | None = None  # online mode: Poisson arrivals at this many requests/s
    repeats: int = 1  # rounds of the engine policies, order reversed every other round
    hw_probe: bool = True  # measure copy / GEMM bounds and a batch-1 decode
    out_dir: str | None = None  # default bench-results/<label>-<workload>
    progress: bool = True  # tqdm bars
    command: str | None = None  # the command line that started the run, for the record

    def __post_init__(self) -> None:
        if not self.policies:
            raise ValueError("at least one engine policy is needed (the baseline)")
        unknown = sorted(set(self.peers) - set(PEER_NAMES))
        if unknown:
            raise ValueError(f"unknown peers {unknown}; expected some of {list(PEER_NAMES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.rate is not None and (self.rate <= 0 or self.peers):
            raise ValueError("online mode (rate) needs rate > 0 and no peers: peers here "
                             "cannot take requests on a schedule")
        if min(self.num_requests, self.threads, self.hf_batch_size, self.repeats) < 1:
            raise ValueError("num_requests, threads, hf_batch_size and repeats must be >= 1")

    @property
    def name(self) -> str:
        return self.label or Path(self.model).name

    def output_dir(self) -> Path:
        return Path(self.out_dir or Path("bench-results") / f"{self.name}-{self.workload}")


@dataclass(frozen=True)
class OfflineBenchResult:
    out_dir: Path
    json_path: Path
    png_path: Path
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # system -> metrics
    ratios: dict[str, Any] = field(default_factory=dict)  # ref -> system -> metric -> ratio


def cli_command(cfg: OfflineBenchConfig) -> str:
    """The `alignedserve` command line that reproduces this configuration."""
    args = ["alignedserve", "bench", "offline", "--model", cfg.label or cfg.model,
            "--workload", cfg.workload, "--policies", ",".join(cfg.policies),
            "--peers", ",".join(cfg.peers) or "none", "--num-requests", str(cfg.num_requests),
            "--dtype", cfg.dtype, "--threads", str(cfg.threads), "--seed", str(cfg.seed),
            "--len-scale", f"{cfg.len_scale:g}", "--hf-batch-size", str(cfg.hf_batch_size),
            "--kv-cache-gib", f"{cfg.kv_cache_gib:g}", "--max-num-seqs", str(cfg.max_num_seqs),
            "--max-num-batched-tokens", str(cfg.max_num_batched_tokens),
            *(f"--{k.replace('_', '-')}={v:g}" if isinstance(v, float) else
              f"--{k.replace('_', '-')}={v}" for k, v in cfg.aligned),
            *(["--rate", f"{cfg.rate:g}"] if cfg.rate is not None else []),
            *(["--repeats", str(cfg.repeats)] if cfg.repeats > 1 else []),
            "--out", str(cfg.output_dir())]
    return shlex.join(args)


def _engine_config(cfg: OfflineBenchConfig, policy: str):
    from alignedserve.engine.config import EngineConfig

    extra = dict(cfg.aligned) if policy == "aligned" else {}
    return EngineConfig(
        model=cfg.model, dtype=cfg.dtype, policy=policy, block_size=cfg.block_size,
        kv_cache_gib=cfg.kv_cache_gib, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, num_threads=cfg.threads, **extra,
    )


def kv_pool_blocks(cfg: OfflineBenchConfig) -> tuple[int, int, int]:
    """(KV blocks, max model len, vocab) exactly as the engine sizes them, without loading it."""
    from alignedserve.engine.config import ModelConfig
    from alignedserve.engine.sizing import pool_sizes

    mc = ModelConfig.from_pretrained(cfg.model)
    sizes = pool_sizes(_engine_config(cfg, "fcfs"), mc)
    return sizes.device_blocks, sizes.max_model_len, mc.vocab_size


def batch_change_rate(stats: list) -> float | None:
    """Fraction of steps whose batch differs from the previous step's.

    A step keeps its batch when it runs no prefill and its decode KV lengths are exactly the
    previous step's plus one (as multisets): nobody joined, left or was preempted.
    """
    if not stats:
        return None
    changed, prev = 0, None
    for s in stats:
        cur = sorted(s.kv_lens)
        if s.num_prefill_tokens or prev is None or cur != [k + 1 for k in prev]:
            changed += 1
        prev = cur
    return changed / len(stats)


def _engine_padding_pct(stats: list) -> float:
    real = sum(sum(s.kv_lens) for s in stats)
    extra = sum(s.padding * sum(s.kv_lens) for s in stats)
    return 100.0 * extra / (real + extra) if real else 0.0


def run_engine(engine, policy: str, requests: list[WorkloadRequest], progress: bool) -> SystemRun:
    """Submit each request at its arrival time (all at t=0 offline) and step the engine
    until all have finished."""
    from alignedserve.scheduling.sampling_params import SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    engine.add_request(list(range(32, 40)), params(4), request_id="warmup")
    while engine.has_unfinished():
        engine.step()
    engine.stats.clear()
    outs, done_at = {}, {}
    bar = tqdm(total=len(requests), desc=policy, unit="req", disable=not progress)
    arrivals = deque(sorted(range(len(requests)), key=lambda i: requests[i].arrival_s))
    t0 = time.monotonic()
    while arrivals or engine.has_unfinished():
        now = time.monotonic() - t0
        while arrivals and requests[arrivals[0]].arrival_s <= now:  # online: on schedule
            i = arrivals.popleft()
            engine.add_request(requests[i].prompt_token_ids, params(requests[i].max_tokens),
                               request_id=f"r{i}")
        if not engine.has_unfinished():
            time.sleep(min(0.01, requests[arrivals[0]].arrival_s - now))
            continue
        for out in engine.step().finished:
            outs[out.request_id], done_at[out.request_id] = out, time.monotonic() - t0
            bar.update(1)
    wall = time.monotonic() - t0
    bar.close()
    stats = list(engine.stats)
    prefill_s = sum(s.seconds for s in stats if s.num_prefill_tokens)
    moves = engine.transfers.stats if engine.transfers is not None else None
    kv_transfer = None if moves is None else {**asdict(moves), "overlap": moves.overlap}
    sched = engine.scheduler.stats().counters if policy == "aligned" else None
    records = [_engine_record(r, outs.get(f"r{i}"), done_at.get(f"r{i}"), t0)
               for i, r in enumerate(requests)]
    return SystemRun(
        name=policy, kind="engine", wall_s=wall, requests=tuple(records),
        decode_tokens=sum(s.num_decode for s in stats if not s.num_prefill_tokens),
        decode_s=wall - prefill_s, iteration_s=tuple(s.seconds for s in stats),
        padding_pct=_engine_padding_pct(stats), batch_change_rate=batch_change_rate(stats),
        notes=f"AlignedServe in-process engine, policy {policy}",
        switch_rate=(sum(s.batch_switch for s in stats) / len(stats)
                     if policy == "aligned" and stats else None),
        kv_transfer=kv_transfer, scheduler=sched,
    )


def _engine_record(req: WorkloadRequest, out, done: float | None, t0: float) -> RequestRecord:
    if out is None:
        return RequestRecord(len(req.prompt_token_ids), req.max_tokens, 0, req.arrival_s,
                             None, None, None, False, ())
    tokens = out.token_ids[: req.max_tokens]
    times = out.token_times[: len(tokens)]
    return RequestRecord(
        prompt_len=len(req.prompt_token_ids), requested=req.max_tokens, generated=len(tokens),
        arrival_s=req.arrival_s, first_token_s=times[0] - t0 if times else None,
        last_token_s=times[-1] - t0 if times else None, done_s=done,
        ok=out.finish_reason == "length" and len(tokens) == req.max_tokens,
        token_ids=tuple(tokens),
    )


def _guarded(name: str, kind: str, fn: Callable[[], SystemRun]) -> SystemRun:
    """Run one system; a failure becomes an error entry so the other systems still run."""
    try:
        return fn()
    except Exception as exc:  # one system failing is data for the report, not a crash
        tb = traceback.format_exc(limit=6)
        return SystemRun(name, kind, 0.0, (), 0, None, (), None, None,
                         error=f"{type(exc).__name__}: {exc}", notes=tb)
    finally:
        gc.collect()


def _run_policy(cfg: OfflineBenchConfig, policy: str, requests: list[WorkloadRequest],
                machine, hw: dict[str, Any]) -> SystemRun:
    from alignedserve.engine.llm_engine import LLMEngine
    from alignedserve.loadgen.hw_bounds import decode_bound

    engine = LLMEngine(_engine_config(cfg, policy), record_stats=True)
    run = run_engine(engine, policy, requests, cfg.progress)
    if machine is not None and "decode_bound" not in hw:
        try:
            hw["decode_bound"] = decode_bound(engine, machine)
        except Exception as exc:  # the probe is extra: keep the run
            hw["decode_bound"] = None
            hw["decode_bound_error"] = f"{type(exc).__name__}: {exc}"
    return run


def _run_peer(cfg: OfflineBenchConfig, peer: str, requests: list[WorkloadRequest],
              kv_blocks: int) -> SystemRun:
    from alignedserve.loadgen import hf_peers

    if peer in ("vllm", "vllm-reserved"):
        from alignedserve.loadgen.vllm_peer import run_vllm

        return run_vllm(
            cfg.model, cfg.dtype, requests, block_size=cfg.block_size,
            kv_cache_gib=cfg.kv_cache_gib, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, seed=cfg.seed,
            threads=cfg.threads, reserved_cpus=0 if peer == "vllm" else None,
            progress=cfg.progress, name=peer,
        )
    if peer == "hf-static":
        return hf_peers.run_hf_static(cfg.model, cfg.dtype, requests, cfg.hf_batch_size,
                                      cfg.progress)
    return hf_peers.run_hf_cb(
        cfg.model, cfg.dtype, requests, num_blocks=kv_blocks, block_size=cfg.block_size,
        max_batch_tokens=cfg.max_num_batched_tokens, max_seqs=cfg.max_num_seqs,
        seed=cfg.seed, progress=cfg.progress,
    )


def run_offline_bench(cfg: OfflineBenchConfig) -> OfflineBenchResult:
    """Run the whole benchmark and write JSON + PNG into cfg.output_dir()."""
    from alignedserve.loadgen.hw_bounds import machine_info, measure_machine

    torch.set_num_threads(cfg.threads)
    info = machine_info()  # before our own load shows in loadavg
    if info["loadavg_1m"] > 1.0:
        print(f"warning: load average {info['loadavg_1m']:.1f} before the run; other processes "
              "skew every number (2-thread torch slows ~10x when cores are shared)",
              file=sys.stderr)
    kv_blocks, max_len, vocab = kv_pool_blocks(cfg)
    requests = make_workload(cfg.workload, cfg.num_requests, vocab, seed=cfg.seed,
                             len_scale=cfg.len_scale, max_model_len=max_len,
                             mode="offline" if cfg.rate is None else "online", rate=cfg.rate)
    hw: dict[str, Any] = {}
    machine = measure_machine() if cfg.hw_probe else None
    if machine is not None:
        hw["machine"] = machine
    rounds: list[dict[str, SystemRun]] = []
    for k in range(cfg.repeats):  # ABBA...: a drift of the host's speed hits both alike
        order = cfg.policies if k % 2 == 0 else cfg.policies[::-1]
        rounds.append({p: _guarded(p, "engine",
                                   lambda p=p: _run_policy(cfg, p, requests, machine, hw))
                       for p in order})
    runs = [_median_run([r[p] for r in rounds]) for p in cfg.policies]
    runs += [_guarded(p, "peer", lambda p=p: _run_peer(cfg, p, requests, kv_blocks))
             for p in cfg.peers]
    return _write_outputs(cfg, requests, runs, hw, max_len, info, rounds)


def _median_run(runs: list[SystemRun]) -> SystemRun:
    """The round whose decode throughput is the median (the lower middle of an even count)."""
    ok = [r for r in runs if r.error is None] or runs
    ok.sort(key=lambda r: report.summarize(r)["decode_tps"] if r.error is None else 0.0)
    return ok[(len(ok) - 1) // 2]


def _round_table(rounds: list[dict[str, SystemRun]], baseline: str) -> list[dict[str, Any]]:
    """Per round: each policy's throughputs and P99 TPOT, and its decode ratio to the
    baseline in that same round."""
    out = []
    for k, rnd in enumerate(rounds):
        sums = {name: report.summarize(r) for name, r in rnd.items() if r.error is None}
        base = sums.get(baseline, {}).get("decode_tps")
        out.append({"round": k + 1, "order": list(rnd), "systems": {
            name: {"decode_tps": s["decode_tps"], "output_tps": s["output_tps"],
                   "tpot_p99_s": s["tpot_s"]["p99"],
                   f"decode_vs_{baseline}": s["decode_tps"] / base if base else None}
            for name, s in sums.items()}})
    return out


def _quantiles(values: list[int]) -> dict[str, float]:
    arr = np.asarray(values)
    return {q: float(np.percentile(arr, p)) for q, p in
            (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}


def _write_outputs(cfg: OfflineBenchConfig, requests: list[WorkloadRequest],
                   runs: list[SystemRun], hw: dict[str, Any], max_len: int,
                   info: dict[str, Any], rounds: list[dict[str, SystemRun]]
                   ) -> OfflineBenchResult:
    out_dir = cfg.output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline = runs[0]
    summaries = {r.name: report.summarize(r) for r in runs}
    for r in runs[1:]:
        summaries[r.name][f"token_match_vs_{baseline.name}"] = report.token_match(r, baseline)
    ratios = report.compute_ratios(summaries, [baseline.name, *cfg.peers])
    mode = "offline" if cfg.rate is None else f"online {cfg.rate:g} req/s"
    title = f"{cfg.name} / {cfg.workload} / {len(requests)} requests / {mode} / {cfg.dtype}"
    hw_plain = {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                for k, v in hw.items()}
    payload = {
        "benchmark": "offline", "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": cfg.command, "equivalent_command": cli_command(cfg),
        "config": asdict(cfg), "machine": info, "hardware": hw_plain,
        "workload": {
            "name": cfg.workload, "num_requests": len(requests), "seed": cfg.seed,
            "len_scale": cfg.len_scale, "max_model_len": max_len,
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "output_tokens": sum(r.max_tokens for r in requests),
            "prompt_len": _quantiles([len(r.prompt_token_ids) for r in requests]),
            "output_len": _quantiles([r.max_tokens for r in requests]),
        },
        "baseline": baseline.name, "systems": summaries, "ratios": ratios,
        # every round when repeated; `systems` holds each policy's median round
        "rounds": _round_table(rounds, baseline.name) if len(rounds) > 1 else [],
        "iteration_latencies_s": {r.name: [round(x, 6) for x in r.iteration_s] for r in runs},
    }
    json_path, png_path = out_dir / "results.json", out_dir / "results.png"
    report.write_json(json_path, payload)
    report.plot_png(png_path, summaries, runs, title)
    report.print_table(summaries, ratios, baseline.name, hw_plain or None, title)
    for rnd in payload["rounds"]:
        print(f"round {rnd['round']} ({' then '.join(rnd['order'])}): " + ", ".join(
            f"{n} {v['decode_tps']:.1f} decode tok/s" + (
                f" ({v[f'decode_vs_{baseline.name}']:.3f}x)" if n != baseline.name and
                v[f"decode_vs_{baseline.name}"] else "") for n, v in rnd["systems"].items()))
    return OfflineBenchResult(out_dir, json_path, png_path, summaries, ratios)
