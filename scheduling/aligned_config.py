"""Knobs and counters of the aligned policy (`scheduling/aligned.py`).

`AlignedKnobs` is the one declaration of the user-facing knobs (name, default, range and
description). The engine's `EngineConfig`, the serving `EngineKnobs` and the simulator's
`SimConfig` inherit it, and the CLI generates its flags from it (`knob_flags`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

AlignBy = Literal["auto", "spread", "longest", "total"]


class AlignedKnobs(BaseModel):
    """The aligned policy's user-facing knobs (ignored by fcfs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_batch: int = Field(
        8, ge=1, description="aligned (the paper's Kmin): a running batch with fewer members "
        "is thin, and its band of lengths moves to the pool's densest group (capped at what "
        "fits the device). Higher: bigger, better-amortized batches but wider KV spread.")
    max_spread: float = Field(
        1.5, ge=1.0, description="aligned: longest / shortest KV length allowed in a batch when "
        "forming or refilling it. Lower: less padding per step, smaller batches.")
    slack_tokens: int = Field(
        128, ge=0, description="aligned: KV lengths within this many tokens of each other also "
        "count as aligned, whatever their ratio (short requests batch freely: their padding "
        "costs little next to the linear layers).")
    align_by: AlignBy = Field(
        "auto", description="aligned: what a misaligned member costs the decode kernel. "
        "spread: padded attention (the CPU engine's dense path), every member pays for the "
        "longest, so lengths must be close both ways. longest: per-sequence GPU kernels "
        "(PagedAttention V1, the simulator's default), only the longest member stalls a "
        "step, so shorter requests join a batch freely. total: load-balanced kernels (the "
        "CPU engine's paged kernel splits work over threads longest first), a step costs "
        "the batch's total KV however lengths are grouped, so length is no reason to wait. "
        "auto: from the engine's decode backend (the CPU paged kernel: total; dense/varlen "
        "chosen by spread, as on GPU: spread).")
    batch_kv_fraction: float = Field(
        0.4, gt=0.0, le=1.0, description="aligned (the paper's Bmax): the candidate-requests "
        "buffer (KV prefetched for the next refills) holds at most this fraction of the device "
        "pool. It bounds only what is staged; the running batch may fill the pool.")
    max_wait_steps: int = Field(
        64, ge=1, description="aligned starvation horizon, in engine steps: a pooled request "
        "one band of lengths away from the running batch joins it after waiting this many "
        "steps, two bands away after about twice as many. Counted in steps, not seconds, so "
        "the same workload batches alike on a faster or slower machine. Lower: tighter "
        "TTFT/ITL tails, less alignment.")
    lookahead_tokens: int = Field(
        128, ge=0, description="aligned: the window, in steps, over which the running batch's "
        "peak growth is kept free when the batch is filled (a member that finishes inside it, "
        "by max_tokens, frees its blocks for the others). 0 fills the device to the brim and "
        "swaps members out when they outgrow it; higher: fewer swap-outs, a smaller batch.")
    max_queue_delay_s: float = Field(
        10.0, gt=0.0, description="aligned, cluster dispatch: the global queue's starvation "
        "horizon in seconds since arrival (the same aging rule as max_wait_steps, on the "
        "router's clock).")


def knob_flags() -> list[tuple[str, type, str]]:
    """(--flag, type, help) for every knob, for argparse; flags default to None (unset)."""
    out = []
    for name, f in AlignedKnobs.model_fields.items():
        kind = (str if get_origin(f.annotation) is Literal
                else f.annotation if isinstance(f.annotation, type) else float)
        out.append((f"--{name.replace('_', '-')}", kind,
                    f"{f.description} (default {f.default})"))
    return out


class AlignedConfig(AlignedKnobs):
    """Everything `AlignedScheduler` reads: the knobs plus limits the engine derives."""

    align_by: AlignBy = Field("spread", description="as AlignedKnobs.align_by, resolved: "
                              "never auto (the engine resolves it from its decode backend)")
    max_batch: int = Field(64, ge=1, description="members of the running batch at most")
    max_num_batched_tokens: int = Field(1024, ge=1, description="tokens in one step at most")
    host_watermark: float = Field(0.05, ge=0.0, lt=1.0, description="host pool fraction kept "
                                  "free at admission, for KV growth")
    refill_buffer: int = Field(4, ge=0, description="candidate-requests buffer: pooled "
                               "requests whose KV is prefetched")
    split_above_tokens: int | None = Field(
        None, ge=1, description="align_by longest: the decode kernel splits a batch's KV into "
        "partitions once a member is longer than this (vLLM's PagedAttention V2 above 8,192 "
        "tokens), and such a step has no straggler: any length joins it, and a request that "
        "long joins any batch. None: the kernel never splits")

    @model_validator(mode="after")
    def _check(self) -> AlignedConfig:
        if self.min_batch > self.max_batch:
            raise ValueError("need min_batch <= max_batch")
        if self.align_by == "auto":
            raise ValueError("align_by 'auto' must be resolved from the decode kernel first")
        return self


@dataclass
class AlignedStats:
    batches: int = 0  # batches formed
    switches: int = 0  # times the batch's band moved to a new group of lengths
    starved: int = 0  # requests that joined from outside the band (the starvation bound)
    preemptions: int = 0  # members swapped out because the device ran short
    recomputes: int = 0  # KV dropped because the host pool could not take it
    refills: int = 0  # requests that joined a running batch in a freed slot
    host_refills: int = 0  # ... whose KV had to come from the host pool
    refill_hits: int = 0  # ... of those, whose KV the candidate-requests buffer had prefetched
