"""Hardware bounds measured in the benchmark's own process, and where a decode step sits.

Batch-1 decode reads every weight once per token, so its bound is memory bandwidth; large
batches amortize the weights and are bound by GEMM FLOP/s. Both are re-measured each run
(with the run's thread count) because machines differ.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch

from alignedserve.engine.cpuinfo import cpu_flags, cpu_model

# Tensor attributes of our model classes that are lookup tables, not GEMM weights: a decode
# step reads one row of them (or none), so they don't count as bytes read per token.
_LOOKUP_ATTRS = frozenset({"embed", "pos_embed", "cos", "sin"})


@dataclass(frozen=True)
class MachineBounds:
    copy_gbps: float  # torch copy_ of a large fp32 tensor, (read + write) bytes / s / 1e9
    read_gbps: float  # torch sum of the same tensor, bytes read / s / 1e9
    gemm_gflops: dict[str, float]  # dtype name -> square GEMM GFLOP/s
    gemm_n: dict[str, int]  # dtype name -> GEMM size n (n x n @ n x n) measured
    copy_mib: int  # size of the copied tensor
    threads: int  # torch intra-op threads during the measurement


@dataclass(frozen=True)
class DecodeBound:
    """One request decoded alone on the engine, against the machine's bounds."""

    kv_len_mean: float  # mean KV length over the measured decode steps
    step_s_median: float  # median seconds of a decode-only step
    weight_bytes_read: int  # GEMM weight bytes read per token (lookup tables excluded)
    weight_bytes_total: int  # every unique weight tensor of the loaded model
    kv_bytes: int  # KV bytes read per token at kv_len_mean
    achieved_gbps: float  # (weight_bytes_read + kv_bytes) / step_s_median / 1e9
    mem_bw_fraction: float  # achieved_gbps / copy_gbps
    mem_bw_fraction_read: float  # achieved_gbps / read_gbps
    bound_tps_batch1: float  # copy_gbps / bytes per token: the batch-1 ceiling
    flops_per_token: float  # 2 x GEMM parameters
    compute_bound_tps: float  # GEMM FLOP/s of the run's dtype / flops_per_token


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _time_copy_and_read(numel: int, repeats: int) -> tuple[float, float]:
    """Best seconds of dst.copy_(src) and of src.sum() over fp32 tensors of numel elements."""
    src = torch.ones(numel)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages before timing
    return (_best_of(lambda: dst.copy_(src), repeats), _best_of(lambda: src.sum(), repeats))


def measure_machine(copy_mib: int = 512, gemm_n: int = 2048, repeats: int = 3) -> MachineBounds:
    """Best-of-`repeats` copy, read and GEMM rates (a few seconds at the defaults on 2 cores)."""
    nbytes = copy_mib * 2**20
    copy_s, read_s = _time_copy_and_read(nbytes // 4, repeats)
    gemm: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        sizes[name], gemm[name] = _gemm_gflops(dtype, gemm_n, repeats)
    return MachineBounds(
        copy_gbps=2 * nbytes / copy_s / 1e9,
        read_gbps=nbytes / read_s / 1e9,
        gemm_gflops=gemm,
        gemm_n=sizes,
        copy_mib=copy_mib,
        threads=torch.get_num_threads(),
    )


def _gemm_gflops(dtype: torch.dtype, max_n: int, repeats: int) -> tuple[int, float]:
    """(n, GFLOP/s) of an n x n GEMM, growing n from 256 up to max_n while one GEMM stays
    under 0.25 s: CPUs without native bf16 run bf16 GEMMs ~500x slower than fp32, and a
    2048^3 one would then take minutes."""
    n, rate = 256, 0.0
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        a @ b  # also warms up the kernel selection
        once = time.perf_counter() - t0
        rate = 2 * n**3 / _best_of(lambda a=a, b=b: a @ b, repeats) / 1e9
        if n * 2 > max_n or once * 8 > 0.25:
            return n, rate
        n *= 2


def model_weight_bytes(model: object) -> tuple[int, int, int]:
    """(bytes read per decode token, all unique weight bytes, GEMM parameters) of an engine model.

    Walks the model object's tensor attributes (and lists / dataclasses of them), deduplicating
    shared storage, so tied embeddings count once; a lookup table tied to the LM head counts
    as read because the logits GEMM reads it whole.
    """
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    _collect(model, "", seen)
    lm_head = getattr(model, "lm_head", None)
    head = getattr(lm_head, "weight", lm_head)  # an engine Linear's (maybe prepacked) weight
    head_ptr = _key(head) if isinstance(head, torch.Tensor) else None
    total = read = params = 0
    for ptr, (attr, t) in seen.items():
        if attr in ("cos", "sin"):
            continue  # RoPE tables: not weights
        nbytes = t.numel() * t.element_size()
        total += nbytes
        is_lookup = attr in _LOOKUP_ATTRS and ptr != head_ptr
        if attr == "embed" and head_ptr is None:
            is_lookup = False  # OPT: embed doubles as the LM head
        if not is_lookup:
            read += nbytes
            params += t.numel()
    return read, total, params


def _key(t: torch.Tensor) -> int:
    """Storage address, or the object's id for an opaque oneDNN tensor (a prepacked fp32
    weight has no storage pointer)."""
    return id(t) if t.is_mkldnn else t.data_ptr()


def _collect(obj: object, attr: str, seen: dict[int, tuple[str, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        seen.setdefault(_key(obj), (attr, obj))
    elif isinstance(obj, list | tuple):
        for item in obj:
            _collect(item, attr, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for name, value in vars(obj).items():
            if name != "cfg":
                _collect(value, name, seen)


def decode_bound(
    engine, machine: MachineBounds, prompt_len: int = 16, tokens: int = 64
) -> DecodeBound:
    """Decode one request alone on `engine` (stats recording on) and place it on the roofline."""
    from alignedserve.scheduling.sampling_params import SamplingParams

    vocab = engine.model_cfg.vocab_size
    prompt = [(17 + 7 * i) % vocab for i in range(prompt_len)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first = len(engine.stats)
    engine.add_request(prompt, params, request_id="hw-bound-probe")
    while engine.has_unfinished():
        engine.step()
    steps = [s for s in engine.stats[first:] if s.num_prefill_tokens == 0 and s.num_decode == 1]
    if not steps:
        raise RuntimeError("the batch-1 probe ran no decode-only step")
    step_s = sorted(s.seconds for s in steps)[len(steps) // 2]
    kv_len = sum(s.kv_lens[0] for s in steps) / len(steps)
    read, total, params_n = model_weight_bytes(engine.runner.model)
    elem = engine.runner.cache.kv.element_size()
    kv_bytes = int(engine.model_cfg.kv_bytes_per_token // 4 * elem * kv_len)
    per_token = read + kv_bytes
    achieved = per_token / step_s / 1e9
    flops = 2.0 * params_n
    return DecodeBound(
        kv_len_mean=kv_len,
        step_s_median=step_s,
        weight_bytes_read=read,
        weight_bytes_total=total,
        kv_bytes=kv_bytes,
        achieved_gbps=achieved,
        mem_bw_fraction=achieved / machine.copy_gbps,
        mem_bw_fraction_read=achieved / machine.read_gbps,
        bound_tps_batch1=machine.copy_gbps * 1e9 / per_token,
        flops_per_token=flops,
        compute_bound_tps=machine.gemm_gflops[engine.cfg.dtype] * 1e9 / flops,
    )


def machine_info() -> dict[str, object]:
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0],  # other processes skew every number; check this
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))),
    }
