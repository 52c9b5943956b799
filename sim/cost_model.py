"""Analytic cost of one device step and of KV transfers, from hardware and model profiles.

Times are seconds; sizes are bytes. fp16/bf16 weights and KV (2 bytes per element) on GPUs.

Decode attention: one thread block per work unit (a sequence's KV for one KV head, or a
slice of it), each streaming its K and V from HBM; the GPU hands units to whichever SM is
free, in index order. Per layer, with `total` the whole batch's KV bytes at full HBM rate
and `unit` the longest unit's bytes at one SM's share of it, the kernel models
(`CostModel.kernel`) are:
    v1      total + (1 - 1/SMs) x unit(longest sequence)   Graham's list-scheduling
            bound: the WORST case of a mixed batch (PagedAttention V1, one unit per
            sequence and head), the paper's vLLM baseline
    vllm    what vLLM dispatches: V1 as above while every sequence is <= 8,192 tokens and
            there is one 512-token partition or sequences x heads > 512; otherwise V2,
            units of at most 512 tokens (as `split`)
    split   total + (1 - 1/SMs) x unit(min(longest, split_tokens)): a load-balanced
            split-KV kernel (Flash-Decoding, FlashInfer)
    fluid   max(total, unit(longest)): perfectly balanced work, but no unit finishes
            faster than one SM can stream it
    none    total: no straggler at all (the `ceiling` baseline)
Alignment can only shrink the part above `total`; weight reads and KV reads cost the same
however requests are grouped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Literal, get_args

PROFILES = Path(__file__).with_name("profiles")
BYTES = 2  # fp16 / bf16
Kernel = Literal["v1", "vllm", "split", "fluid", "none"]
KERNELS: tuple[str, ...] = get_args(Kernel)
VLLM_PARTITION = 512  # PagedAttention V2's partition, tokens
VLLM_V1_MAX_LEN = 8192  # longer sequences always take V2
VLLM_V1_MIN_UNITS = 512  # V1 needs more than this many (sequence, head) blocks


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_gbps: float  # HBM bandwidth, GB/s
    hbm_gib: float  # HBM capacity, GiB
    peak_tflops: float  # dense fp16/bf16 tensor throughput, TFLOP/s
    num_sms: int  # attention work units run this many at a time
    bw_eff: float  # achievable fraction of hbm_gbps
    flops_eff: float  # achievable fraction of peak_tflops
    kernel_overhead_us: float  # fixed cost per attention kernel launch
    layer_overhead_us: float  # fixed cost per layer per step (launches, norms, glue)
    pcie_gbps: float  # host <-> device, per direction
    pcie_eff: float
    pcie_latency_us: float
    nvlink_gbps: float  # device <-> device, per direction
    nvlink_eff: float
    nvlink_latency_us: float
    step_overhead_us: float = 0.0  # per step on the host (scheduler, launch), optional

    @property
    def bw(self) -> float:
        return self.hbm_gbps * 1e9 * self.bw_eff

    @property
    def flops(self) -> float:
        return self.peak_tflops * 1e12 * self.flops_eff


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated_ffn: bool  # SwiGLU (3 FFN matrices) or a plain MLP (2)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attn += self.heads * self.head_dim * self.hidden
        return attn + (3 if self.gated_ffn else 2) * self.hidden * self.ffn

    @property
    def params(self) -> int:
        """Weights read by one step: every layer plus the LM head (embedding lookups are
        gathers, not reads of the whole table)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES


def _load(name: str) -> dict[str, dict]:
    return json.loads((PROFILES / f"{name}.json").read_text())


@cache
def hardware(name: str) -> Hardware:
    data = _load("hardware")
    local = PROFILES / "cpu-local.json"
    if name == "cpu-local" and local.is_file():
        data[name] = json.loads(local.read_text())
        if data[name].get("kind") == "fitted-step":
            raise ValueError("cpu-local is a fitted CPU step model (sim/calibrate.py), not a "
                             "GPU profile; the cluster simulator does not run on it yet")
    if name not in data or name.startswith("_"):
        raise ValueError(f"unknown hardware {name!r}; known: {known('hardware')}")
    keys = {f.name for f in fields(Hardware)} - {"name"}
    return Hardware(name=name, **{k: v for k, v in data[name].items() if k in keys})


@cache
def model(name: str) -> Model:
    data = _load("models")
    if name not in data or name.startswith("_"):
        raise ValueError(f"unknown model {name!r}; known: {known('models')}")
    return Model(name=name, **data[name])


def known(kind: str) -> list[str]:
    return sorted(k for k in _load(kind) if not k.startswith("_"))


@dataclass(frozen=True)
class CostModel:
    hw: Hardware
    m: Model
    kernel: Kernel = "v1"  # the decode attention model (module doc)
    split_tokens: int = 512  # KV tokens per work unit of the `split` kernel

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown decode kernel model {self.kernel!r}; known: {KERNELS}")

    def linear(self, tokens: int) -> float:
        """All layers' GEMMs plus the LM head for `tokens` tokens (decode + prefill alike):
        weights are read once per step (memory bound) or the FLOPs dominate."""
        if tokens == 0:
            return 0.0
        return max(self.m.params * BYTES / self.hw.bw, 2 * self.m.params * tokens / self.hw.flops)

    def decode_attention(self, kv_lens: list[int]) -> float:
        """Attention of one decode token per sequence, summed over layers (see module doc)."""
        return sum(self.attention_parts(kv_lens))

    def attention_parts(self, kv_lens: list[int]) -> tuple[float, float]:
        """`decode_attention` as (what the batch's total KV costs, the straggler above it):
        the second part is all that grouping by length can remove (0 under `none`)."""
        if not kv_lens:
            return 0.0, 0.0
        per_token = self.m.kv_heads * self.m.head_dim * 2 * BYTES  # K and V, all KV heads
        total = sum(kv_lens) * per_token / self.hw.bw  # every SM streaming: whole-HBM rate
        longest = max(kv_lens)
        per_sm = self.hw.bw / self.hw.num_sms

        def unit(tokens: int) -> float:  # one work unit of `tokens` tokens, one KV head
            return tokens * self.m.head_dim * 2 * BYTES / per_sm

        kernel, split = self.kernel, self.split_tokens
        if kernel == "vllm":  # V1 while it has enough blocks or one partition; else V2
            v1 = longest <= VLLM_V1_MAX_LEN and (
                longest <= VLLM_PARTITION or len(kv_lens) * self.m.heads > VLLM_V1_MIN_UNITS)
            kernel, split = ("v1", split) if v1 else ("split", VLLM_PARTITION)
        if kernel == "fluid":
            extra = max(0.0, unit(longest) - total)
        elif kernel == "none":
            extra = 0.0
        else:
            cut = min(longest, split) if kernel == "split" else longest
            extra = (1 - 1 / self.hw.num_sms) * unit(cut)
        layers = self.m.layers
        return layers * (total + self.hw.kernel_overhead_us * 1e-6), layers * extra

    def prefill_attention(self, chunks: list[tuple[int, int]]) -> float:
        """Causal attention FLOPs of prefill chunks given as (start, length)."""
        flops = 0.0
        for start, n in chunks:
            flops += 4 * self.m.heads * self.m.head_dim * n * (start + (n + 1) / 2)
        return self.m.layers * flops / self.hw.flops

    def step(self, decode_lens: list[int], prefill: list[tuple[int, int]]) -> float:
        """One engine step: decodes with these KV lengths plus prefill chunks."""
        return self.step_parts(decode_lens, prefill)[0]

    def step_parts(self, decode_lens: list[int], prefill: list[tuple[int, int]]
                   ) -> tuple[float, float]:
        """(`step`'s seconds, the decode straggler's share of them)."""
        tokens = len(decode_lens) + sum(n for _, n in prefill)
        if tokens == 0:
            return 0.0, 0.0
        fixed = (self.m.layers * self.hw.layer_overhead_us + self.hw.step_overhead_us) * 1e-6
        base, straggler = self.attention_parts(decode_lens)
        return (self.linear(tokens) + base + straggler + self.prefill_attention(prefill)
                + fixed, straggler)

    def pcie(self, nbytes: int) -> float:
        """Host -> device (or back) over this device's PCIe link."""
        return self.hw.pcie_latency_us * 1e-6 + nbytes / (
            self.hw.pcie_gbps * 1e9 * self.hw.pcie_eff)

    def nvlink(self, nbytes: int) -> float:
        return self.hw.nvlink_latency_us * 1e-6 + nbytes / (
            self.hw.nvlink_gbps * 1e9 * self.hw.nvlink_eff)

    def kv_bytes(self, blocks: int, block_size: int) -> int:
        return blocks * block_size * self.m.kv_bytes_per_token
