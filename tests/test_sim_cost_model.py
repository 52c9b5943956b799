"""The simulator's cost model, by hand: model sizes, GEMM and attention time (the
straggler part included), links and prefill, and the profiles."""

from __future__ import annotations

import pytest

from alignedserve.sim.cost_model import CostModel, Hardware, Model, hardware, model

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
    split = CostModel(HW, M, kernel="split", split_tokens=100)
    assert split.decode_attention(mixed) == pytest.approx(cm.decode_attention(aligned))
    # fluid: perfect balance, but the longest unit still takes its own time; none: total.
    fluid, none = CostModel(HW, M, kernel="fluid"), CostModel(HW, M, kernel="none")
    assert fluid.decode_attention(mixed) == pytest.approx(2 * max(total, unit(550)))
    assert none.decode_attention(mixed) == pytest.approx(2 * total)
    # vLLM's dispatch: 10 sequences x 8 heads = 80 blocks <= 512 and 550 > one 512-token
    # partition, so V2 (512-token units); with one partition it stays V1.
    vllm = CostModel(HW, M, kernel="vllm")
    assert vllm.decode_attention(mixed) == pytest.approx(2 * (total + 0.9 * unit(512)))
    assert vllm.decode_attention(aligned) == pytest.approx(cm.decode_attention(aligned))
    many = [50] * 64 + [550]  # 65 x 8 = 520 blocks > 512: V1, whole-sequence units
    assert vllm.decode_attention(many) == pytest.approx(cm.decode_attention(many))
    # The straggler part is what grouping by length can remove: above the total KV's cost.
    base, extra = cm.attention_parts(mixed)
    assert (base, extra) == pytest.approx((2 * total, 2 * 0.9 * unit(550)))
    assert none.attention_parts(mixed)[1] == 0
    assert fluid.attention_parts(mixed)[1] == 0  # here the total outlasts the longest unit
    alone = 5000 * per_token / 1e12
    assert unit(5000) > alone
    assert fluid.attention_parts([5000])[1] == pytest.approx(2 * (unit(5000) - alone))
    step, straggler = cm.step_parts(mixed, [(0, 4)])
    assert step == cm.step(mixed, [(0, 4)]) and straggler == extra
    with pytest.raises(ValueError, match="unknown decode kernel"):
        CostModel(HW, M, kernel="v3")


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


def test_copy_links_are_full_duplex_fifo_and_order_a_swap_in_after_its_swap_out():
    from alignedserve.scheduling.interface import KVTransfer
    from alignedserve.sim.links import CopyLinks

    cm = CostModel(HW, M)
    links = CopyLinks(cm, prefetch=False, block_bytes=50_000_000)  # 1 ms + 10 us per block
    out = KVTransfer(1, "a", "swap_out", (0,), (0,))
    other_in = KVTransfer(2, "b", "swap_in", (1,), (1,))
    a_in = KVTransfer(3, "a", "swap_in", (0,), (2,))
    links.start((out, other_in, a_in), now=0.0)
    one = 1e-3 + 10e-6
    assert links.done_time(1) == pytest.approx(one)
    assert links.done_time(2) == pytest.approx(one)  # the other direction ran alongside
    assert links.done_time(3) == pytest.approx(2 * one)  # waited for a's swap-out, then b's
    assert links.advance(one / 2) == 0 and links.advance(one) == 2 and links.advance(1) == 3
    via = CopyLinks(cm, prefetch=True, block_bytes=50_000_000)  # PCIe then NVLink, pipelined
    assert via.copy_time(50_000_000) == pytest.approx(1e-3 + 10e-6)
