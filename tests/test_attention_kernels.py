"""The C++ paged decode kernel against the torch reference (one SDPA call per sequence over
exactly its KV), on the engine's own pool layout: strided per-layer views, shuffled block
tables, GQA and MHA, sliding windows that start mid-block, fp32 and bf16. The prefill
kernel against SDPA with the causal mask, on the same layout, and the engine's use of it."""

from __future__ import annotations

import os
import random

import pytest
import torch

from alignedserve.engine import config as engine_config
from alignedserve.engine.attention import DECODE_BACKENDS, build_decode_batch
from alignedserve.engine.config import EngineConfig, preferred_dtype
from alignedserve.engine.native import kernels

BLOCK = 16


def _case(heads: int, kv_heads: int, lens: list[int], dtype: torch.dtype, seed: int = 0,
          dim: int = 32, block: int = BLOCK):
    """A 3-layer pool [blocks, layers, K|V, slot, kv_heads, dim] and a batch on layer 1."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = sum(-(-n // block) for n in lens) + 5
    pool = torch.randn(num_blocks, 3, 2, block, kv_heads, dim, dtype=dtype)
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, i = [], 0
    for n in lens:
        need = -(-n // block)
        tables.append(order[i : i + need])
        i += need
    q = torch.randn(len(lens), heads, dim, dtype=dtype)
    return q, pool[:, 1, 0], pool[:, 1, 1], tables


def test_the_kernels_build_here():
    """CI machines have a compiler: the engine must not silently run the slow fallback."""
    assert kernels() is not None


def test_a_build_killed_midway_does_not_hang_the_next_process(tmp_path):
    """torch's build lock is a plain file; a killed build leaves it, and the next process
    used to wait on it forever. Here: a copy of this machine's build with such a lock."""
    import shutil
    import subprocess
    import sys

    from alignedserve.engine.native import build_dir

    assert kernels() is not None
    copy = tmp_path / build_dir().name
    shutil.copytree(build_dir(), copy)  # mtimes kept: ninja finds nothing to rebuild
    (copy / "lock").touch()
    env = {**os.environ, "ALIGNEDSERVE_EXT_DIR": str(tmp_path)}
    code = "from alignedserve.engine.native import kernels; assert kernels() is not None"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "left by a kernel build that was killed" in out.stderr
    assert not (copy / "lock").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (4, 4), (8, 1), (8, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 40])
def test_paged_matches_per_sequence_sdpa(dtype, heads, kv_heads, window):
    lens = [1, 15, 16, 17, 90, 333, 5, 1000]  # block edges, one token, one long sequence
    q, k, v, tables = _case(heads, kv_heads, lens, dtype)
    _assert_matches_reference(q, k, v, tables, lens, window, BLOCK)


# Head dims: whole SIMD vectors (the 16-row score path on AVX-512), a vector and a tail
# (24 on AVX-512; 20 on AVX2 and AVX-512), and less than one vector; a 32-slot block holds
# two 16-row groups.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("dim", "block"), [(64, 32), (24, 16), (20, 16), (8, 32)])
def test_head_dims_and_block_sizes(dtype, dim, block):
    lens = [1, 31, 32, 33, 100, 700]
    q, k, v, tables = _case(9, 3, lens, dtype, dim=dim, block=block)
    _assert_matches_reference(q, k, v, tables, lens, None, block)


def _assert_matches_reference(q, k, v, tables, lens, window, block):
    dtype = q.dtype
    ref = DECODE_BACKENDS["varlen"].forward(
        q, k, v, build_decode_batch(tables, lens, block, window, False), 0.17)
    out = DECODE_BACKENDS["paged"].forward(
        q, k, v, build_decode_batch(tables, lens, block, window, False), 0.17)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_few_and_many_sequences_agree_across_thread_counts(threads):
    """Below 2 sequences per thread the kernel splits work by KV head, above by sequence."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in ([700], [50, 1200, 3, 64, 64, 900]):
            q, k, v, tables = _case(6, 2, lens, torch.float32, seed=len(lens))
            batch = build_decode_batch(tables, lens, BLOCK, None, False)
            ref = DECODE_BACKENDS["varlen"].forward(q, k, v, batch, 0.2)
            out = DECODE_BACKENDS["paged"].forward(q, k, v, batch, 0.2)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_bad_inputs_are_refused_with_a_message():
    q, k, v, tables = _case(4, 2, [20], torch.float32)
    batch = build_decode_batch(tables, [20], BLOCK, None, False)
    with pytest.raises(RuntimeError, match="dtype"):
        DECODE_BACKENDS["paged"].forward(q.bfloat16(), k, v, batch, 1.0)
    with pytest.raises(RuntimeError, match="head shapes"):
        DECODE_BACKENDS["paged"].forward(q[:, :3], k, v, batch, 1.0)


@pytest.mark.parametrize(("flags", "want"), [
    ({"avx2", "avx512f"}, "float32"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
])
def test_auto_dtype_is_bf16_only_with_native_bf16_math(monkeypatch, flags, want):
    monkeypatch.setattr(engine_config, "cpu_flags", lambda: frozenset(flags))
    assert preferred_dtype() == want
    assert EngineConfig(model="m").dtype == want


def test_explicit_dtype_wins_and_the_resolved_one_travels():
    assert EngineConfig(model="m", dtype="float32").dtype == "float32"
    # the resolved value travels: a config rebuilt from a dump keeps it
    cfg = EngineConfig(model="m", dtype="bfloat16")
    assert EngineConfig.model_validate(cfg.model_dump()).dtype == "bfloat16"


def test_attention_bench_reports_both_backends_against_the_read_bound():
    from alignedserve.loadgen.bench_attention import run

    res = run("float32", threads=1, iters=1, repeats=1, layers=2,
              prefill_chunks=((0, 40), (64, 20)))
    assert [t["backend"] for t in res["timings"]] == ["paged", "varlen", "paged-aligned",
                                                       "paged-dram"]
    assert [(p["start"], p["length"]) for p in res["prefill"]] == [(0, 40), (64, 20)]
    for p in res["prefill"]:
        assert p["sdpa_ms"] > 0 and p["kernel_ms"] > 0 and p["kernel_gflops"] > 0
    assert res["mixed_over_aligned"] > 0
    assert res["kv_bytes_per_layer"] == res["kv_tokens"] * 3 * 64 * 2 * 4
    for t in res["timings"]:
        assert t["ms_per_layer"] > 0 and 0 < t["read_bw_fraction"] < 5


def _prefill_dtypes() -> list:
    """fp32 everywhere the kernels build; bf16 only on CPUs with AVX512-BF16."""
    have = kernels().paged_prefill_dtypes() if kernels() is not None else []
    return [pytest.param(d, marks=pytest.mark.skipif(
        str(d).removeprefix("torch.") not in have,
        reason=f"this build's prefill kernel has no {d}")) for d in (torch.float32, torch.bfloat16)]


def _prefill_reference(q, k, v, table, start, window, block):
    """SDPA in fp32 over the chunk's KV gathered from the pool, with the causal (window) mask."""
    total = start + q.shape[0]
    kk = k[table].flatten(0, 1)[:total].transpose(0, 1).float()
    vv = v[table].flatten(0, 1)[:total].transpose(0, 1).float()
    q_pos = torch.arange(start, total)[:, None]
    k_pos = torch.arange(total)[None, :]
    keep = k_pos <= q_pos
    if window:
        keep &= k_pos > q_pos - window
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None].float(), kk[None], vv[None], attn_mask=keep, scale=0.17,
        enable_gqa=True)
    return out[0].transpose(0, 1)


# Chunks that start at 0 and later ones (a block edge, mid-block), one token, tiles of 32
# query tokens and a partial last tile; GQA 3 and 4, MHA, MQA; head dims 32-128; blocks of
# 16 and 32; windows shorter than the chunk and starting mid-block.
@pytest.mark.parametrize("dtype", _prefill_dtypes())
@pytest.mark.parametrize(("start", "length", "heads", "kv_heads", "dim", "block", "window"), [
    (0, 1, 9, 3, 64, 32, 0),
    (0, 33, 9, 3, 64, 32, 0),
    (0, 300, 9, 3, 64, 16, 0),
    (64, 50, 8, 2, 128, 32, 0),
    (37, 90, 8, 8, 64, 32, 0),
    (1024, 300, 9, 3, 64, 32, 0),
    (5, 70, 4, 1, 32, 16, 0),
    (200, 120, 6, 2, 96, 32, 40),
    (0, 100, 9, 3, 64, 32, 17),
])
def test_paged_prefill_matches_masked_sdpa(dtype, start, length, heads, kv_heads, dim, block,
                                           window):
    rng = random.Random(start + length)
    torch.manual_seed(length)
    total = start + length
    num_blocks = -(-total // block) + 4
    pool = torch.randn(num_blocks, 2, 2, block, kv_heads, dim).to(dtype)
    k, v = pool[:, 1, 0], pool[:, 1, 1]
    order = list(range(num_blocks))
    rng.shuffle(order)
    table = torch.tensor(order[: -(-total // block)])
    q = torch.randn(length, heads, dim).to(dtype)
    out = kernels().paged_prefill(q, k, v, table, start, window, 0.17)
    ref = _prefill_reference(q, k, v, table, start, window, block)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_paged_prefill_refuses_what_it_cannot_run():
    assert kernels() is not None
    pool = torch.randn(4, 1, 2, 32, 2, 64)
    k, v = pool[:, 0, 0], pool[:, 0, 1]
    q = torch.randn(10, 4, 64)
    with pytest.raises(RuntimeError, match="dtype differ"):
        kernels().paged_prefill(q.bfloat16(), k, v, torch.arange(4), 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        kernels().paged_prefill(q.double(), k.double(), v.double(), torch.arange(4), 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="does not cover"):
        kernels().paged_prefill(q, k, v, torch.arange(1), 30, 0, 1.0)
    odd = torch.randn(4, 1, 2, 32, 2, 48)
    with pytest.raises(RuntimeError, match="head dim"):
        kernels().paged_prefill(q[..., :48].contiguous(), odd[:, 0, 0], odd[:, 0, 1],
                                torch.arange(4), 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels().paged_prefill(q, k[..., :32], v[..., :32], torch.arange(4), 0, 0, 1.0)


@pytest.mark.parametrize("dtype", _prefill_dtypes())
def test_engine_prefills_through_the_kernel_and_sdpa_is_selectable(dtype, tiny_dir, pools,
                                                                   monkeypatch):
    from alignedserve.llm import LLM
    from alignedserve.scheduling.sampling_params import SamplingParams

    calls = []
    real = kernels().paged_prefill
    monkeypatch.setattr(kernels(), "paged_prefill", lambda *a: calls.append(a[4]) or real(*a))
    prompts = [[5 + i for i in range(n)] for n in (3, 40, 130)]
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True)
    runs = {}
    for mode in ("kernel", "sdpa"):
        calls.clear()
        llm = LLM(str(tiny_dir), dtype=str(dtype).removeprefix("torch."), prefill_attention=mode,
                  max_num_batched_tokens=64, **pools)
        runs[mode] = llm.generate(prompts, greedy, use_tqdm=False)
        layers = llm.engine.model_cfg.num_layers
        if mode == "kernel":  # every layer of every chunk; the 130-token prompt in 3 chunks
            assert len(calls) >= layers * 4 and max(calls) > 0
        else:
            assert calls == []
    # The two paths round differently; the first token's logprob barely moves.
    tol = 1e-3 if dtype == torch.float32 else 0.1
    for a, b in zip(runs["kernel"], runs["sdpa"], strict=True):
        assert abs(a.logprobs[0] - b.logprobs[0]) < tol or a.token_ids[0] != b.token_ids[0]
    same = sum(a.token_ids[0] == b.token_ids[0]
               for a, b in zip(runs["kernel"], runs["sdpa"], strict=True))
    assert same >= 2


@pytest.mark.parametrize("dtype", _prefill_dtypes())
def test_auto_prefill_leaves_bf16_to_sdpa_on_amx_only(dtype, monkeypatch):
    from types import SimpleNamespace

    from alignedserve.engine import attention

    cache = SimpleNamespace(kv=torch.zeros(1, dtype=dtype), block_size=BLOCK)
    for flags, auto in ((frozenset({"avx512_bf16"}), True),
                        (frozenset({"avx512_bf16", "amx_bf16"}), dtype == torch.float32)):
        monkeypatch.setattr(attention, "cpu_flags", lambda f=flags: f)
        assert attention.use_prefill_kernel("auto", cache, 64) is auto
        assert attention.use_prefill_kernel("kernel", cache, 64) is True
        assert attention.use_prefill_kernel("sdpa", cache, 64) is False
    assert attention.use_prefill_kernel("kernel", cache, 48) is False  # not a fit: SDPA


def test_the_serve_configs_prefill_attention_reaches_the_replicas_engine(monkeypatch, tiny_dir):
    from alignedserve.config import ServeConfig
    from alignedserve.deployments.limits import engine_config

    assert engine_config(ServeConfig(), str(tiny_dir), 2).prefill_attention == "auto"
    monkeypatch.setenv("ALIGNEDSERVE_ENGINE__PREFILL_ATTENTION", "kernel")
    cfg = ServeConfig()
    assert engine_config(cfg, str(tiny_dir), 2).prefill_attention == "kernel"
    with pytest.raises(ValueError, match="prefill_attention"):
        ServeConfig(engine={"prefill_attention": "flash"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_reads_strided_query_rows_and_writes_into_out(dtype):
    """q as the engine passes it (a view of the fused qkv rows, each row's heads contiguous)
    and the result written into the caller's rows: the same values as a contiguous call."""
    lens = [1, 33, 200, 700]
    q, k, v, tables = _case(9, 3, lens, dtype, dim=64)
    batch = build_decode_batch(tables, lens, BLOCK, None, False)
    wide = torch.randn(len(lens), 9 * 64 + 2 * 3 * 64, dtype=dtype)
    wide[:, : 9 * 64] = q.flatten(1)
    view = wide[:, : 9 * 64].view(len(lens), 9, 64)
    assert not view.is_contiguous()
    paged = DECODE_BACKENDS["paged"]
    ref = paged.forward(q, k, v, batch, 0.17)
    out = torch.full((len(lens) + 2, 9, 64), 7.0, dtype=dtype)
    got = paged.forward(view, k, v, batch, 0.17, out[1:-1])
    assert torch.equal(out[1:-1], ref) and torch.equal(got, ref)
    assert (out[0] == 7).all() and (out[-1] == 7).all()  # rows outside `out` untouched
    for name in ("dense", "varlen"):  # the torch backends honour `out` too
        dest = torch.empty_like(ref)
        res = DECODE_BACKENDS[name].forward(view, k, v, build_decode_batch(
            tables, lens, BLOCK, None, name == "dense"), 0.17, dest)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(dest.float(), ref.float(), atol=tol, rtol=tol)
        assert res.data_ptr() == dest.data_ptr()
    with pytest.raises(RuntimeError, match="out must be"):
        kernels().paged_decode(q, k, v, batch.tables, batch.table_starts, batch.lens, 0, 0.17,
                               torch.empty(len(lens), 9, 32, dtype=dtype))
