"""Request state as token counts (vLLM v1 style: no prefill/decode phase flags).

A request holds `token_ids` = prompt followed by generated tokens. The KV of the first
`num_computed_tokens` of them exists: in the device cache while the request holds device
blocks, in the host pool while it is swapped out (aligned policy). Prefill, chunked
prefill, decode and recompute after preemption are all "compute tokens
[num_computed_tokens, num_tokens)".
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from alignedserve.scheduling.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds device KV blocks and is scheduled each step
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the client or the server


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30  # tokens (prompt + output) the model can hold
    arrival_time: float = field(default_factory=time.monotonic)  # monotonic seconds

    token_ids: list[int] = field(init=False)  # prompt then output ids
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose KV exists (device, or host when swapped out)
    block_ids: list[int] = field(default_factory=list)  # device KV blocks, in position order
    host_block_ids: list[int] = field(default_factory=list)  # host pool blocks, position order
    num_host_tokens: int = 0  # leading tokens whose KV in the host pool is up to date
    kv_ready_seq: int = 0  # KVTransfer seq that must finish before this request computes
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # monotonic seconds, set by the scheduler

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> FinishReason | None:
        """Record a sampled token; return why the request ends now, if it does."""
        tokens = self.token_ids
        tokens.append(token_id)
        p = self.params
        if token_id in p.stop_token_ids:
            return FinishReason.STOP
        if not p.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        n = len(tokens)  # once per token of every request: the properties inlined
        if n - self.num_prompt_tokens >= p.max_tokens or n >= self.max_model_len:
            return FinishReason.LENGTH
        return None
