"""Per-request sampling and stopping parameters (the vLLM `SamplingParams` contract)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. Validated on construction.

    `temperature == 0` means greedy; the top-k/top-p/min-p filters then have no effect.
    """

    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = disabled, else keep the k most likely tokens
    top_p: float = 1.0  # nucleus mass in (0, 1]
    min_p: float = 0.0  # drop tokens with p < min_p * p_max, in [0, 1]
    seed: int | None = None  # per-request RNG seed; same seed, same tokens
    stop: tuple[str, ...] = ()  # stop strings, matched on detokenized output text
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request
    ignore_eos: bool = False  # EOS may still be generated; it just does not end the request
    logprobs: bool = False  # return the log-probability of each sampled token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
