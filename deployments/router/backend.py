"""The contract between the router's front ends (OpenAI HTTP, gRPC) and whatever generates.

The front ends tokenize, validate and turn token events into text; a `GenerationBackend`
only moves token ids. The production backend is the Redis-queue cluster
(`deployments/redis_backend.py`); tests of the front ends use a fake one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from alignedserve.global_queue.events import TokenEvent
from alignedserve.scheduling.sampling_params import SamplingParams

__all__ = ["GenerateRequest", "GenerationBackend", "TokenEvent"]


@dataclass(frozen=True)
class GenerateRequest:
    """One accepted request, as the router hands it to the backend."""

    request_id: str  # unique; client-supplied (gRPC) or made by the router
    prompt_token_ids: tuple[int, ...]  # already validated: non-empty, < max_model_len
    params: SamplingParams  # max_tokens already resolved (never exceeds the context)
    arrival_time: float  # time.time() seconds when the router accepted it


class GenerationBackend(Protocol):
    """Invariant: every accepted request ends with exactly one final event (finish_reason
    or error), or is aborted; nothing accepted is silently dropped."""

    def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Submit `req` and stream its events. Cancelling the iterator does not abort."""
        ...

    async def admit(self, request_id: str) -> None:
        """Raise APIError when `request_id` cannot be accepted now: 429 (the queue is full)
        or 503 (the queue is unreachable), with `retry_after_s`. Called before a request
        is answered, so the client gets the status, not an in-stream error. Admitting
        holds a place for it until `generate` submits it: concurrent arrivals cannot all
        pass the same count."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop `request_id` wherever it is and free its KV. Unknown ids are ignored."""
        ...

    async def server_info(self) -> dict[str, object]:
        """Queue depths, replica count and the like, for /v1 status and gRPC ServerInfo.
        Raises APIError(503) when the queue cannot be reached."""
        ...
