"""The simulator: cost-model arithmetic by hand, the very policy classes, determinism."""

from __future__ import annotations

import math

import pytest

from alignedserve.sim import cluster
from alignedserve.sim.cluster import SimConfig, SimPair, simulate
from alignedserve.sim.cost_model import CostModel, Hardware, Model, hardware, model
from alignedserve.sim.run import run_sim, system_config
from alignedserve.sim.workload import sim_workload

HW = Hardware("toy", hbm_gbps=1000, hbm_gib=80, peak_tflops=100, num_sms=10, bw_eff=1.0,
              flops_eff=1.0, kernel_overhead_us=0.0, layer_overhead_us=0.0, pcie_gbps=50,
              pcie_eff=1.0, pcie_latency_us=10.0, nvlink_gbps=400, nvlink_eff=1.0,
              nvlink_latency_us=0.0)
M = Model("toy", layers=2, hidden=1024, heads=8, kv_heads=8, ffn=4096, vocab=1000,
          gated_ffn=False)


def test_model_sizes_by_hand():
    # per layer: qkv 1024*(8+16)*128 + out 1024*1024 + 2 * 1024*4096 = 4M + 8M = 12,582,912
    assert M.layer_params == 12 * 1024 * 1024
    assert M.params == 2 * 12 * 1024 * 1024 + 1000 * 1024
    assert M.kv_bytes_per_token == 2 * 2 * 8 * 128 * 2  # K+V, 2 layers, 8 heads, 128, fp16
    opt13 = model("opt-13b")
    assert 12.5e9 < opt13.params < 13.2e9, "OPT-13B has ~12.9B parameters"
    assert model("llama-3-8b").kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_linear_is_memory_bound_then_compute_bound():
    cm = CostModel(HW, M)
    weights_s = M.params * 2 / 1e12
    assert cm.linear(1) == pytest.approx(weights_s)  # 2*P FLOPs at 1e14/s is far less
    big = 10_000
    assert cm.linear(big) == pytest.approx(2 * M.params * big / 1e14)


def test_decode_attention_straggler_by_hand():
    cm = CostModel(HW, M)
    per_token = 8 * 128 * 2 * 2  # bytes of K and V per token over all KV heads, one layer
    aligned = [100] * 10
    mixed = [50] * 9 + [550]  # same total KV
    total = 1000 * per_token / 1e12
    unit = lambda n: n * 128 * 2 * 2 / (1e12 / 10)  # noqa: E731 - one (seq, head) block
    assert cm.decode_attention(aligned) == pytest.approx(2 * (total + 0.9 * unit(100)))
    assert cm.decode_attention(mixed) == pytest.approx(2 * (total + 0.9 * unit(550)))
    split = CostModel(HW, M, split_kv=True, split_tokens=100)
    assert split.decode_attention(mixed) == pytest.approx(cm.decode_attention(aligned))


def test_links_and_prefill_by_hand():
    cm = CostModel(HW, M)
    assert cm.pcie(50_000_000) == pytest.approx(10e-6 + 1e-3)
    assert cm.nvlink(400_000_000) == pytest.approx(1e-3)
    # one chunk of 4 tokens from position 0: 4*heads*dim*n*(start+(n+1)/2) FLOPs per layer
    flops = 4 * 8 * 128 * 4 * 2.5
    assert cm.prefill_attention([(0, 4)]) == pytest.approx(2 * flops / 1e14)


def test_profiles_load_and_reject_unknown_names():
    assert hardware("h100-sxm").num_sms == 132 and hardware("a100-80g").hbm_gbps == 2039
    with pytest.raises(ValueError, match="unknown hardware"):
        hardware("tpu-v9")
    with pytest.raises(ValueError, match="unknown model"):
        model("gpt-5")


def test_the_simulator_drives_the_engines_own_policy_classes():
    from alignedserve.engine import llm_engine

    cost = CostModel(hardware("h100-sxm"), model("opt-2.7b"))
    aligned = SimPair(SimConfig(policy="aligned"), cost).scheduler
    fcfs = SimPair(SimConfig(policy="fcfs"), cost).scheduler
    assert type(aligned) is llm_engine.AlignedScheduler
    assert type(fcfs) is llm_engine.FCFSScheduler
    assert cluster.AlignedScheduler is llm_engine.AlignedScheduler


def small_workload(n: int = 60, seed: int = 0):
    return sim_workload("mix95", n, seed=seed, len_scale=4.0)


def test_small_cluster_completes_and_is_deterministic():
    wl = small_workload()
    cfg = SimConfig(model="opt-2.7b", pairs=2, min_batch=4)
    a, b = simulate(cfg, wl), simulate(cfg, wl)
    assert [(r.steps, r.end_s, r.tpot_s.tolist()) for r in a] == [
        (r.steps, r.end_s, r.tpot_s.tolist()) for r in b]
    assert sum(int((r.ttft_s >= 0).sum()) for r in a) == len(wl)
    assert all(r.end_s > 0 and math.isfinite(r.end_s) for r in a)


def test_run_sim_systems_and_gpu_parity():
    base = SimConfig(model="opt-2.7b", min_batch=4)
    assert system_config(base, "aligned", 8).pairs == 4
    assert system_config(base, "fcfs", 8).pairs == 8
    assert not system_config(base, "aligned-noprefetch", 8).prefetch
    res = run_sim(base, "mix95", 40, gpus=2, len_scale=4.0)
    for name, s in res.items():
        assert s["completed"] == 40, name
        assert s["decode_tps"] > 0 and s["tpot_p99_ms"] >= s["tpot_p50_ms"] > 0
    with pytest.raises(ValueError):
        system_config(base, "nope", 8)
