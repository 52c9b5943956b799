"""A `GenerationBackend` for front-end tests: it "generates" a fixed story's token ids with
the real tokenizer, honours max_tokens, stop strings and stop ids like the engine (the token
that completes a stop string ends the request), and records what it was asked.

Special seeds pick behaviours: `SLOW_SEED` emits a token every `slow_delay_s` (for
disconnect tests), `FAIL_SEED` fails the request with an error event after two tokens,
`OVERLOAD_SEED` refuses it as a draining or overloaded backend does (APIError 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from alignedserve.deployments.router.backend import GenerateRequest, TokenEvent
from alignedserve.deployments.router.openai_protocol import APIError
from alignedserve.engine.tokenizer import find_stop

STORY = ("Once upon a time, a small fox lived by the river. Every morning the fox said: "
         "hello world! Then it ran to the old mill and back again. The end. ")
SLOW_SEED = 777
FAIL_SEED = 666
OVERLOAD_SEED = 503


class FakeBackend:
    def __init__(self, tokenizer, slow_delay_s: float = 0.05, replicas: int = 1,
                 queue_limit: int | None = None) -> None:
        self.tok = tokenizer
        self.story: list[int] = list(tokenizer.encode(STORY))
        self.slow_delay_s = slow_delay_s
        self.replicas = replicas
        self.submitted: dict[str, GenerateRequest] = {}
        self.outputs: dict[str, list[int]] = {}  # request id -> every id emitted
        self.aborted: list[str] = []
        self.queue_limit = queue_limit  # admit() refuses (429) beyond this many in flight
        self.inflight = 0

    def token(self, i: int) -> int:
        """The i-th output id of every request."""
        return self.story[i % len(self.story)]

    def _stops(self, req: GenerateRequest, ids: list[int]) -> bool:
        p = req.params
        if ids[-1] in p.stop_token_ids:
            return True
        text = self.tok.decode(ids, skip_special_tokens=p.skip_special_tokens)
        return find_stop(text, p.stop, len(text)) is not None

    async def generate(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid, p = req.request_id, req.params
        if p.seed == OVERLOAD_SEED:
            raise APIError("the server is draining", status=503, code="overloaded")
        self.submitted[rid] = req
        self.inflight += 1
        try:
            async for ev in self._events(req):
                yield ev
        finally:
            self.inflight -= 1

    async def _events(self, req: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid, p = req.request_id, req.params
        ids = self.outputs[rid] = []
        step = 0
        while True:
            if rid in self.aborted:
                yield TokenEvent((), len(ids), finish_reason="abort")
                return
            await asyncio.sleep(self.slow_delay_s if p.seed == SLOW_SEED else 0)
            if p.seed == FAIL_SEED and len(ids) >= 2:
                yield TokenEvent((), len(ids), error="replica fake-0 failed")
                return
            new: list[int] = []
            finish = None
            for _ in range(1 + step % 2):  # events of one and of two ids
                ids.append(self.token(len(ids)))
                new.append(ids[-1])
                if self._stops(req, ids):
                    finish = "stop"
                elif len(ids) >= p.max_tokens:
                    finish = "length"
                if finish:
                    break
            step += 1
            lps = tuple(-0.25 * (1 + i % 4) for i in range(len(new))) if p.logprobs else None
            yield TokenEvent(tuple(new), len(ids), finish, lps)
            if finish:
                return

    async def admit(self, request_id: str) -> None:
        if self.queue_limit is not None and self.inflight >= self.queue_limit:
            raise APIError(f"the server is at capacity ({self.inflight} requests queued)",
                           429, code="rate_limit_exceeded", type_="rate_limit_error",
                           retry_after_s=2.0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def server_info(self) -> dict[str, object]:
        return {"replicas": self.replicas, "queued": 0, "submitted": len(self.submitted)}
