"""Knobs and counters of the aligned policy (`scheduling/aligned.py`).

`AlignedKnobs` is the one declaration of the user-facing knobs (name, default, range and
description). The engine's `EngineConfig`, the serving `EngineKnobs` and the simulator's
`SimConfig` inherit it, and the CLI generates its flags from it (`knob_flags`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AlignedKnobs(BaseModel):
    """The aligned policy's user-facing knobs (ignored by fcfs)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_batch: int = Field(
        8, ge=1, description="aligned (the paper's Kmin): a new batch takes at least this many "
        "requests when that many are in flight (capped at what fits). Higher: bigger, "
        "better-amortized batches but wider KV spread and longer waits for peers.")
    max_spread: float = Field(
        1.5, ge=1.0, description="aligned: longest / shortest KV length allowed in a batch when "
        "forming or refilling it. Lower: less padding per step, smaller batches.")
    slack_tokens: int = Field(
        128, ge=0, description="aligned: KV lengths within this many tokens of each other also "
        "count as aligned, whatever their ratio (short requests batch freely: their padding "
        "costs little next to the linear layers).")
    batch_kv_fraction: float = Field(
        0.4, gt=0.0, le=1.0, description="aligned (the paper's Bmax): a new batch's KV, with "
        "lookahead, fits in this fraction of the device pool, leaving room to copy the next "
        "batch in while this one runs.")
    max_queue_delay_s: float = Field(
        10.0, gt=0.0, description="aligned starvation bound: a request that waited this long "
        "for a batch joins the next one whatever its length. Lower: tighter TTFT/ITL tails, "
        "less alignment under load.")
    min_batch_steps: int = Field(
        8, ge=1, description="aligned: steps a full batch runs before a starving request may "
        "displace it; bounds batch switches (and copies) per step.")


def knob_flags() -> list[tuple[str, type, str]]:
    """(--flag, type, help) for every knob, for argparse; flags default to None (unset)."""
    out = []
    for name, f in AlignedKnobs.model_fields.items():
        kind = f.annotation if isinstance(f.annotation, type) else float
        out.append((f"--{name.replace('_', '-')}", kind,
                    f"{f.description} (default {f.default})"))
    return out


class AlignedConfig(AlignedKnobs):
    """Everything `AlignedScheduler` reads: the knobs plus limits the engine derives."""

    max_batch: int = Field(64, ge=1, description="members of the running batch at most")
    max_num_batched_tokens: int = Field(1024, ge=1, description="tokens in one step at most")
    host_watermark: float = Field(0.05, ge=0.0, lt=1.0, description="host pool fraction kept "
                                  "free at admission, for KV growth")
    lookahead_tokens: int = Field(128, ge=0, description="growth per member (up to its "
                                  "max_tokens) counted against Bmax")
    refill_buffer: int = Field(4, ge=0, description="candidate-requests buffer: pooled "
                               "requests whose KV is prefetched")

    @model_validator(mode="after")
    def _check(self) -> AlignedConfig:
        if self.min_batch > self.max_batch:
            raise ValueError("need min_batch <= max_batch")
        return self


@dataclass
class AlignedStats:
    batches: int = 0  # batches formed
    switches: int = 0  # steps whose running batch was replaced by a candidate
    starved: int = 0  # requests taken out of length order by the starvation bound
    preemptions: int = 0  # members swapped out because the device ran short
    recomputes: int = 0  # KV dropped because the host pool could not take it
    refills: int = 0  # requests that joined a running batch in a freed slot
    refill_hits: int = 0  # ... whose KV the candidate-requests buffer had already prefetched
