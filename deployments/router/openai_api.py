"""The OpenAI-compatible front end: validation, tokenization, SSE, usage, errors, aborts.

`OpenAIFrontend` holds no Serve state: the Serve router delegates its routes to it, and
`create_app` mounts it on a plain FastAPI app (tests, or running without Ray). A request
that is abandoned (the client disconnects, or Serve cancels the handler) is aborted in the
backend, streaming or not, so its KV is freed everywhere.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from alignedserve.deployments.metrics import FrontendMetrics
from alignedserve.deployments.router.backend import GenerateRequest, GenerationBackend, TokenEvent
from alignedserve.deployments.router.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ChunkFormat,
    CompletionRequest,
    new_id,
    openapi_body,
    parse_request,
    to_sampling_params,
    validation_error,
)
from alignedserve.deployments.router.text_stream import TextStream
from alignedserve.logs import rid
from alignedserve.scheduling.sampling_params import SamplingParams

log = logging.getLogger("alignedserve.router")
_DISCONNECT_POLL_S = 0.5
COMPLETIONS_BODY = openapi_body(CompletionRequest)
CHAT_BODY = openapi_body(ChatCompletionRequest)


@dataclass
class Generation:
    """One request in flight, as the front ends see it."""

    request: GenerateRequest
    text: TextStream
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)


class OpenAIFrontend:
    def __init__(self, backend: GenerationBackend, tokenizer, model_name: str,
                 max_model_len: int, vocab_size: int,
                 metrics: FrontendMetrics | None = None, api_key: str | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = metrics
        self.api_key = api_key  # None: no authentication (the default, as vLLM's)
        self.started = time.time()
        self.active = 0
        self._bg: set[asyncio.Task] = set()

    # -- shared by HTTP and gRPC ----------------------------------------------------------------

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError("the prompt is empty", param=param)
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise APIError(f"token ids must be integers in [0, {self.vocab_size})", param=param)
        return ids

    def authorize(self, authorization: str | None) -> None:
        """`Authorization: Bearer <key>` (HTTP header or gRPC metadata) when a key is set;
        raises APIError(401) otherwise. /health and /metrics do not ask."""
        if self.api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.api_key):
            raise APIError("a valid API key is required: Authorization: Bearer <key>",
                           status=401, code="invalid_api_key")

    async def start(self, rid: str, ids: list[int], params: SamplingParams) -> Generation:
        """Admit a validated request (raises APIError 429/503 when the queue cannot take
        it, before any response starts)."""
        await self.backend.admit(rid)
        return Generation(GenerateRequest(rid, tuple(ids), params, time.time()),
                          TextStream(self.tokenizer, params))

    async def run(self, gen: Generation) -> AsyncGenerator[tuple[str, TokenEvent]]:
        """(text delta, event) per backend event, until the final one. Abandoning the
        iterator before then (close, cancellation, an exception) aborts the request in the
        backend; a backend error event raises APIError(500)."""
        self.active += 1
        done = False
        try:
            async with _closing(self.backend.generate(gen.request)) as events:
                async for ev in events:
                    done = ev.error is not None or ev.finish_reason is not None
                    yield self._apply(gen, ev), ev
                    if done:
                        return
            raise APIError("the backend ended the request without a final event", 500)
        finally:
            self.active -= 1
            if not done:
                self.abort_later(gen.request.request_id)

    def _apply(self, gen: Generation, ev: TokenEvent) -> str:
        """Fold one event into `gen`; the text delta it releases."""
        if ev.error is not None:
            raise APIError(ev.error, status=500)
        t = time.time()
        if ev.token_ids:
            gen.first_token_at = gen.first_token_at or t
            gen.token_times.append(t)
        gen.token_ids.extend(ev.token_ids)
        gen.completion_tokens = ev.num_output_tokens
        gen.logprobs.extend(ev.logprobs or ())
        delta = gen.text.push(ev.token_ids)
        if ev.finish_reason is not None:
            gen.finish_reason = ev.finish_reason
            delta += gen.text.finish()
            self._record(gen)
        return delta

    def abort_later(self, rid: str) -> None:
        """Abort from a finally block of a cancelled task: run it as its own task."""
        task = asyncio.get_running_loop().create_task(self.backend.abort(rid))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _record(self, gen: Generation) -> None:
        if self.metrics is None:
            return
        arrival = gen.request.arrival_time
        times = gen.token_times
        gaps = [b - a for a, b in itertools.pairwise(times)]
        self.metrics.request_done(
            None if gen.first_token_at is None else gen.first_token_at - arrival, gaps,
            time.time() - arrival, len(gen.request.prompt_token_ids), gen.completion_tokens,
            gen.finish_reason or "abort")

    # -- HTTP routes ----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        self.authorize(request.headers.get("authorization"))
        body = parse_request(CompletionRequest, await _json(request))
        self._check_model(body.model)
        ids = self._completion_prompt(body.prompt)
        gen = await self.start(new_id("cmpl"), ids, to_sampling_params(body, len(ids),
                                                                 self.max_model_len))
        return await self._respond(request, body, gen, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        self.authorize(request.headers.get("authorization"))
        body = parse_request(ChatCompletionRequest, await _json(request))
        self._check_model(body.model)
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError("this model has no chat template; use /v1/completions",
                           param="messages")
        enc = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)
        ids = self.check_ids(list(enc["input_ids"]), "messages")
        gen = await self.start(new_id("chatcmpl"), ids, to_sampling_params(body, len(ids),
                                                                     self.max_model_len))
        return await self._respond(request, body, gen, chat=True)

    async def models(self, request: Request) -> Response:
        self.authorize(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(self.started),
            "owned_by": "alignedserve", "max_model_len": self.max_model_len}]})

    async def health(self) -> Response:
        """200 once a compute replica is up and the queue answers (readiness); 503 with the
        reason in the OpenAI error format before."""
        try:
            info = await self.backend.server_info()
            if not info.get("replicas", 1):
                raise APIError("no compute replica is ready", status=503, retry_after_s=2.0)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        return PlainTextResponse("")

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(f"the model {model!r} does not exist; this server has "
                           f"{self.model_name!r}", status=404, param="model",
                           code="model_not_found")

    def _completion_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.check_ids(self.tokenizer.encode(prompt), "prompt")
        return self.check_ids(list(prompt), "prompt")

    async def _respond(self, request: Request, body, gen: Generation, chat: bool) -> Response:
        req = gen.request
        fmt = ChunkFormat(req.request_id, self.model_name, chat, len(req.prompt_token_ids),
                          self.tokenizer if req.params.logprobs else None)
        if body.stream:
            return _SSEResponse(self._sse(gen, fmt, body.include_usage()),
                                media_type="text/event-stream")
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(request))
        consume = asyncio.get_running_loop().create_task(_drain(self.run(gen)))
        try:
            finished, _ = await asyncio.wait({consume, watcher},
                                             return_when=asyncio.FIRST_COMPLETED)
            if consume not in finished:  # the client left: cancelling aborts the request
                consume.cancel()
                return Response(status_code=499)
            consume.result()
        finally:
            watcher.cancel()
            if not consume.done():
                consume.cancel()
        return JSONResponse(fmt.full(gen.text.text, gen.finish_reason, gen.completion_tokens,
                                     gen.token_ids, gen.logprobs))

    async def _sse(self, gen: Generation, fmt: ChunkFormat,
                   include_usage: bool) -> AsyncGenerator[str]:
        try:
            if fmt.chat:
                yield _event(fmt.chunk({"role": "assistant", "content": ""}, None))
            async with aclosing(self.run(gen)) as events:
                async for delta, ev in events:
                    lps = list(ev.logprobs or ())
                    if delta or ev.finish_reason or lps:
                        yield _event(fmt.chunk(delta, ev.finish_reason, ev.token_ids, lps))
            if include_usage:
                yield _event(fmt.usage_chunk(gen.completion_tokens))
        except APIError as e:
            yield _event(e.body())
        except Exception as e:  # a mid-stream failure is reported in-stream, then [DONE]
            log.exception("stream failed", extra=rid(gen.request.request_id))
            yield _event(APIError(f"internal error: {type(e).__name__}: {e}", 500).body())
        yield "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """Closes its generator however the response ends. Starlette leaves a generator that is
    suspended at a `yield` open when the client disconnects (or Serve cancels the task), and
    only its close runs the abort in `OpenAIFrontend.run`."""

    def __init__(self, content: AsyncGenerator[str], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self._events = content

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


@asynccontextmanager
async def _closing(events: AsyncIterator[TokenEvent]) -> AsyncIterator[AsyncIterator[TokenEvent]]:
    """Like `aclosing`, for any AsyncIterator (the protocol does not promise `aclose`)."""
    try:
        yield events
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _drain(events: AsyncGenerator) -> None:
    async with aclosing(events):
        async for _ in events:
            pass


async def _watch_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def _json(request: Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the body is not valid JSON: {e}") from e


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as {"error": {...}} with its status; never a stack trace."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = APIError(str(exc.detail), status=exc.status_code, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error answered with 500", exc_info=exc)
        err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500)
        return JSONResponse(err.body(), status_code=500)


def create_app(frontend: OpenAIFrontend, metrics_text: Callable[[], str] | None = None
               ) -> FastAPI:
    """A plain FastAPI app over `frontend` (the Serve router declares the same routes).
    `metrics_text` (e.g. `metrics.prometheus_text`) may block: it runs in a thread."""
    app = FastAPI(title="AlignedServe")
    install_error_handlers(app)
    app.add_api_route("/v1/completions", frontend.completions, methods=["POST"],
                      openapi_extra=COMPLETIONS_BODY)
    app.add_api_route("/v1/chat/completions", frontend.chat_completions, methods=["POST"],
                      openapi_extra=CHAT_BODY)
    app.add_api_route("/v1/models", frontend.models, methods=["GET"])
    app.add_api_route("/health", frontend.health, methods=["GET"])

    async def metrics() -> Response:
        text = "" if metrics_text is None else await run_in_threadpool(metrics_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app
