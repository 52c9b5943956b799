"""Knobs and counters of the aligned policy (`scheduling/aligned.py`).

EngineConfig exposes the user-facing knobs with their effects; the simulator builds this
config directly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AlignedConfig:
    """Knobs of the aligned policy; see docs in EngineConfig for their user-facing effect."""

    max_batch: int = 64  # members of the running batch at most
    min_batch: int = 8  # Kmin: a batch is formed from at least this many requests if it can
    max_spread: float = 1.5  # longest / shortest KV length allowed when forming or refilling
    slack_tokens: int = 128  # ... or longest - shortest up to this many tokens
    batch_kv_fraction: float = 0.4  # Bmax: a new batch's KV (with lookahead) <= this of device
    max_queue_delay_s: float = 10.0  # starvation bound on the time a request waits in the pool
    min_batch_steps: int = 8  # steps a batch runs before a starving request may displace it
    max_num_batched_tokens: int = 1024  # tokens (decode + prefill chunks) in one step at most
    host_watermark: float = 0.05  # host pool fraction kept free at admission, for KV growth
    lookahead_tokens: int = 128  # growth per member (up to its max_tokens) counted against Bmax
    refill_buffer: int = 4  # candidate-requests buffer: pooled requests whose KV is prefetched

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.max_batch:
            raise ValueError("need 1 <= min_batch <= max_batch")
        if self.max_spread < 1.0 or not 0.0 < self.batch_kv_fraction <= 1.0:
            raise ValueError("need max_spread >= 1 and 0 < batch_kv_fraction <= 1")
        if self.max_queue_delay_s <= 0 or self.min_batch_steps < 1:
            raise ValueError("need max_queue_delay_s > 0 and min_batch_steps >= 1")
        if self.max_num_batched_tokens < 1 or not 0.0 <= self.host_watermark < 1.0:
            raise ValueError("need max_num_batched_tokens >= 1 and 0 <= host_watermark < 1")


@dataclass
class AlignedStats:
    batches: int = 0  # batches formed
    switches: int = 0  # steps whose running batch was replaced by a candidate
    starved: int = 0  # requests taken out of length order by the starvation bound
    preemptions: int = 0  # members swapped out because the device ran short
    recomputes: int = 0  # KV dropped because the host pool could not take it
    refills: int = 0  # requests that joined a running batch in a freed slot
    refill_hits: int = 0  # ... whose KV the candidate-requests buffer had already prefetched
