"""Paged decode attention alone: the C++ kernel against the torch backend it replaced, on
one layer of a batch shaped like `profile_step`'s (61 sequences of 100-300 tokens and three
of 1,500-2,000), with the achieved K/V read rate beside the machine's read bandwidth.
It also times the paged kernel on an aligned batch of the same size and total KV (every
sequence at the mean length): mixed / aligned time is the straggler that KV-length
alignment could remove from this kernel, the CPU engine's alignment ceiling.

One layer's K/V (13-27 MB) stays in this host's L3 from call to call, which no model step
sees, so `paged-dram` runs the kernel over the same batch in `layers` distinct layers of
one pool laid out as the engine's ([block, layer, K|V, slot, head, dim]), one layer after
the other, as a model step does: its rate is what memory gives the kernel.

Prefill: one chunk of each shape in `PREFILL_CHUNKS` (start, length) through the engine's
SDPA path (earlier chunks' KV gathered from the pool, an explicit mask after the first
chunk) and through the C++ prefill kernel where this build and dtype have it.

    python -m alignedserve.loadgen.bench_attention --dtype bfloat16 --threads 2

Blocks are shuffled over a pool larger than the batch, as the engine's are. Each figure is
the best of `repeats` rounds of `iters` calls (these machines are noisy).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from alignedserve.engine.attention import DECODE_BACKENDS, build_decode_batch
from alignedserve.engine.native import kernels
from alignedserve.loadgen.hw_bounds import measure_machine

PREFILL_CHUNKS = ((0, 256), (0, 1024), (1024, 1024), (1800, 128))


@dataclass(frozen=True)
class KernelTiming:
    backend: str  # "paged" (C++), "varlen" (torch); "paged-aligned": same total KV, equal lengths
    ms_per_layer: float  # best mean milliseconds of one call
    kv_gbps: float  # K/V bytes read per call / seconds / 1e9
    read_bw_fraction: float  # kv_gbps / the machine's measured read bandwidth


@dataclass(frozen=True)
class PrefillTiming:
    start: int  # the chunk's first position (tokens of KV before it)
    length: int  # query tokens in the chunk
    sdpa_ms: float  # the engine's SDPA path: gather + one masked (or causal) call
    kernel_ms: float | None  # the C++ prefill kernel; None where this build/dtype lacks it
    kernel_gflops: float | None  # causal attention FLOPs / kernel time


def _batch(lens: list[int], dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
           block: int, seed: int):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    need = [-(-n // block) for n in lens]
    order = list(range(sum(need) + 16))
    rng.shuffle(order)
    k = torch.randn(len(order), block, kv_heads, dim).to(dtype)
    v = torch.randn(len(order), block, kv_heads, dim).to(dtype)
    tables, i = [], 0
    for n in need:
        tables.append(order[i:i + n])
        i += n
    q = torch.randn(len(lens), heads, dim).to(dtype)
    return q, k, v, build_decode_batch(tables, lens, block, None, False)


def _dram_timing(lens: list[int], dtype: torch.dtype, heads: int, kv_heads: int, dim: int,
                 block: int, layers: int, repeats: int, read_gbps: float, seed: int
                 ) -> KernelTiming:
    """The paged kernel over `layers` distinct layers of one engine-layout pool, in turn."""
    rng = random.Random(seed)
    need = [-(-n // block) for n in lens]
    order = list(range(sum(need) + 16))
    rng.shuffle(order)
    pool = torch.randn(len(order), layers, 2, block, kv_heads, dim).to(dtype)
    tables, i = [], 0
    for n in need:
        tables.append(order[i:i + n])
        i += n
    q = torch.randn(len(lens), heads, dim).to(dtype)
    batch = build_decode_batch(tables, lens, block, None, False)
    fwd = DECODE_BACKENDS["paged"].forward
    fwd(q, pool[:, 0, 0], pool[:, 0, 1], batch, dim ** -0.5)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(layers):
            fwd(q, pool[:, layer, 0], pool[:, layer, 1], batch, dim ** -0.5)
        best = min(best, (time.perf_counter() - t0) / layers)
    kv_bytes = sum(lens) * kv_heads * dim * 2 * pool.element_size()
    gbps = kv_bytes / best / 1e9
    return KernelTiming("paged-dram", round(best * 1e3, 3), round(gbps, 2),
                        round(gbps / read_gbps, 3))


def _best_ms(fn, iters: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return round(best * 1e3, 3)


def _prefill_chunk(mod, has_kernel: bool, dtype: torch.dtype, heads: int, kv_heads: int,
                   dim: int, block: int, start: int, length: int, iters: int, repeats: int,
                   seed: int) -> PrefillTiming:
    total = start + length
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-total // block)
    pool = torch.randn(nblocks + 4, 2, 2, block, kv_heads, dim, generator=g).to(dtype)
    k, v = pool[:, 1, 0], pool[:, 1, 1]
    table = torch.randperm(nblocks + 4, generator=g)[:nblocks]
    q = torch.randn(length, heads, dim, generator=g).to(dtype)
    mask = (None if start == 0 else
            torch.arange(total)[None, :] <= torch.arange(start, total)[:, None])

    def sdpa():
        kk = k.index_select(0, table).flatten(0, 1)[:total].transpose(0, 1)
        vv = v.index_select(0, table).flatten(0, 1)[:total].transpose(0, 1)
        return F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], kk[None], vv[None], attn_mask=mask,
            is_causal=mask is None, scale=dim ** -0.5, enable_gqa=True)

    sdpa_ms = _best_ms(sdpa, iters, repeats)
    if not has_kernel:
        return PrefillTiming(start, length, sdpa_ms, None, None)
    kernel_ms = _best_ms(lambda: mod.paged_prefill(q, k, v, table, start, 0, dim ** -0.5),
                         iters, repeats)
    flops = heads * dim * 4 * (length * start + length * length / 2)
    return PrefillTiming(start, length, sdpa_ms, kernel_ms,
                         round(flops / (kernel_ms / 1e3) / 1e9, 1))


def prefill_timings(dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int,
                    chunks: tuple[tuple[int, int], ...], iters: int, repeats: int, seed: int
                    ) -> list[PrefillTiming]:
    """Each chunk through the engine's SDPA path and through the prefill kernel."""
    mod = kernels()
    has_kernel = (mod is not None
                  and str(dtype).removeprefix("torch.") in mod.paged_prefill_dtypes())
    return [_prefill_chunk(mod, has_kernel, dtype, heads, kv_heads, dim, block, start, length,
                           iters, repeats, seed) for start, length in chunks]


def run(dtype: str = "float32", threads: int = 2, heads: int = 9, kv_heads: int = 3,
        dim: int = 64, block: int = 32, iters: int = 20, repeats: int = 5,
        backends: tuple[str, ...] = ("paged", "varlen"), seed: int = 0, layers: int = 30,
        prefill_chunks: tuple[tuple[int, int], ...] = PREFILL_CHUNKS) -> dict[str, object]:
    """Timings of each backend on one layer; shapes default to SmolLM2-135M's."""
    rng = random.Random(seed)
    lens = [rng.randint(100, 300) for _ in range(61)] + [1500, 1800, 2000]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        machine = measure_machine(copy_mib=256, gemm_n=256, repeats=3)
        q, k, v, batch = _batch(lens, getattr(torch, dtype), heads, kv_heads, dim, block, seed)
        kv_bytes = sum(lens) * kv_heads * dim * 2 * k.element_size()
        rows = [_time(name, name, q, k, v, batch, kv_bytes, machine.read_gbps, dim, iters,
                      repeats) for name in backends]
        if "paged" in backends:
            mean = sum(lens) // len(lens)
            even = [mean + (i < sum(lens) - mean * len(lens)) for i in range(len(lens))]
            q2, k2, v2, b2 = _batch(even, getattr(torch, dtype), heads, kv_heads, dim, block, seed)
            rows.append(_time("paged-aligned", "paged", q2, k2, v2, b2, kv_bytes,
                              machine.read_gbps, dim, iters, repeats))
            if layers > 0:
                rows.append(_dram_timing(lens, getattr(torch, dtype), heads, kv_heads, dim,
                                         block, layers, repeats, machine.read_gbps, seed))
        prefill = prefill_timings(getattr(torch, dtype), heads, kv_heads, dim, block,
                                  prefill_chunks, max(1, iters // 4), repeats, seed)
    finally:
        torch.set_num_threads(before)
    ms = {r.backend: r.ms_per_layer for r in rows}
    straggler = (round(ms["paged"] / ms["paged-aligned"], 3) if "paged-aligned" in ms
                 else None)
    return {"dtype": dtype, "threads": threads, "kv_tokens": sum(lens),
            "kv_bytes_per_layer": kv_bytes, "read_gbps": round(machine.read_gbps, 1),
            "timings": [asdict(r) for r in rows], "mixed_over_aligned": straggler,
            "prefill": [asdict(r) for r in prefill]}


def _time(label: str, name: str, q, k, v, batch, kv_bytes: int, read_gbps: float, dim: int,
          iters: int, repeats: int) -> KernelTiming:
    fwd = DECODE_BACKENDS[name].forward
    fwd(q, k, v, batch, dim ** -0.5)  # warm up (and build the kernel once)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fwd(q, k, v, batch, dim ** -0.5)
        best = min(best, (time.perf_counter() - t0) / iters)
    gbps = kv_bytes / best / 1e9
    return KernelTiming(label, round(best * 1e3, 3), round(gbps, 2), round(gbps / read_gbps, 3))


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    res = run(a.dtype, a.threads)
    for r in res["timings"]:
        print(f"{r['backend']:>6} {a.dtype} {a.threads} threads: {r['ms_per_layer']:.2f} ms "
              f"per layer, {r['kv_gbps']:.1f} GB/s of K/V = {r['read_bw_fraction']:.0%} of "
              f"the {res['read_gbps']} GB/s read bandwidth")
    if res["mixed_over_aligned"] is not None:
        print(f"mixed / aligned batch, same total KV: {res['mixed_over_aligned']:.3f}x "
              "(the straggler KV-length alignment could remove from this kernel)")
    for r in res["prefill"]:
        kern = ("kernel not built for this dtype/CPU" if r["kernel_ms"] is None else
                f"kernel {r['kernel_ms']:.2f} ms ({r['kernel_gflops']} GFLOP/s), "
                f"{r['sdpa_ms'] / r['kernel_ms']:.2f}x")
        print(f"prefill chunk start {r['start']} length {r['length']}: SDPA path "
              f"{r['sdpa_ms']:.2f} ms, {kern}")
    print(json.dumps(res))
