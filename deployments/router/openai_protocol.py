"""OpenAI request schemas, their translation to SamplingParams, and the error format.

Accepted: the fields common clients send (the openai SDK, `vllm bench serve`, llmperf).
Unknown fields are ignored, as OpenAI does. Fields we cannot honour are rejected with a 400
naming the field, rather than silently ignored:
- `n` other than 1, `best_of`, `echo`, `suffix`, non-zero presence/frequency penalties and a
  `repetition_penalty` other than 1.0;
- `top_logprobs` > 0 (chat) or `logprobs` > 1 (completions): only the sampled token's
  logprob is available (`logprobs: true`, or `logprobs: 0|1` for completions); responses
  carry it with an empty `top_logprobs`.

Statuses: 400 `invalid_request_error` (schema errors too, where FastAPI would say 422), 404
`model_not_found`, 500 `server_error`, 503 when overloaded or draining. A backend signals
the last by raising `APIError(..., status=503, code="overloaded")` from `generate()`; a
streamed request has already sent its 200 then, so it gets the error in-stream.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignedserve.scheduling.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client caused (or an overload): becomes {"error": {...}} with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, type_: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after_s = retry_after_s  # 429/503: when the client may try again

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise APIError(f"content part type {p.get('type')!r} is not supported; only "
                               "text", param="messages")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _reject_unsupported(req: _Common) -> None:
    if req.n != 1:
        raise APIError("only n=1 is supported", param="n")
    if req.repetition_penalty not in (None, 1.0):
        raise APIError("repetition_penalty other than 1.0 is not supported",
                       param="repetition_penalty")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0.0):
            raise APIError(f"{name} other than 0 is not supported", param=name)
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError("echo is not supported", param="echo")
        if req.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError("best_of other than 1 is not supported", param="best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= 1:
            raise APIError("only the sampled token's logprob is available (logprobs <= 1)",
                           param="logprobs")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs:
        raise APIError("top_logprobs is not supported; logprobs=true gives the sampled "
                       "token's logprob", param="top_logprobs")


def to_sampling_params(req: _Common, prompt_len: int, max_model_len: int) -> SamplingParams:
    """Validate and translate; max_tokens defaults to the rest of the context (as vLLM)."""
    _reject_unsupported(req)
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens; this model's context is "
                       f"{max_model_len} tokens and at least one must be left for the output",
                       param="prompt" if isinstance(req, CompletionRequest) else "messages")
    asked = req.max_tokens
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        asked = req.max_completion_tokens
    if asked is not None and asked > room:
        raise APIError(f"max_tokens is {asked}, but the prompt has {prompt_len} tokens and the "
                       f"context is {max_model_len}: at most {room} can be generated",
                       param="max_tokens")
    logprobs = (bool(req.logprobs) if isinstance(req, ChatCompletionRequest) else
                isinstance(req, CompletionRequest) and req.logprobs is not None)
    top_k = req.top_k or 0  # vLLM's -1 (disabled) is our 0; other negatives are rejected
    try:
        return SamplingParams(
            max_tokens=room if asked is None else asked,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if top_k == -1 else top_k,
            min_p=req.min_p or 0.0, seed=req.seed,
            stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
        )
    except ValueError as e:  # SamplingParams names the field in its message
        field = str(e).split(" ", 1)[0]
        raise APIError(str(e), param=field if field.isidentifier() else None) from e


def parse_request(model: type[_Common], payload: object) -> Any:
    """`payload` (decoded JSON) as `model`, or APIError(400) naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError("the body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise validation_error(e.errors()) from e


def validation_error(errors: Any) -> APIError:
    """The first schema error as a 400 naming the field (OpenAI answers 400 where FastAPI
    would answer 422)."""
    if not errors:
        return APIError("invalid request")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if not isinstance(x, int) and x != "body"]
    return APIError(f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}",
                    param=loc[0] if loc else None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


class ChunkFormat:
    """OpenAI response bodies and SSE chunks of one request (`n` is always 1).

    Logprobs are those of the sampled tokens only: `top_logprobs` is always empty."""

    def __init__(self, request_id: str, model: str, chat: bool, prompt_tokens: int,
                 logprobs_tokenizer: Any = None) -> None:
        self.id, self.model, self.chat = request_id, model, chat
        self.prompt_tokens = prompt_tokens
        self.tok = logprobs_tokenizer  # set when the request asked for logprobs
        self.created = now()

    def _logprobs(self, ids: Sequence[int], lps: Sequence[float]) -> dict[str, Any] | None:
        if self.tok is None:
            return None
        toks = [self.tok.decode([t]) for t in ids]
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": []} for t, lp in zip(toks, lps, strict=False)]}
        return {"tokens": toks, "token_logprobs": list(lps), "top_logprobs": None,
                "text_offset": []}

    def _body(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}

    def chunk(self, delta: str | dict[str, str], finish: str | None, ids: Sequence[int] = (),
              lps: Sequence[float] = ()) -> dict[str, Any]:
        """One SSE chunk: `delta` is new text (or, for chat, a whole delta dict)."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = delta if isinstance(delta, dict) else (
                {"content": delta} if delta else {})
        else:
            choice["text"] = delta
        choice.update(logprobs=self._logprobs(ids, lps), finish_reason=finish)
        return self._body("chat.completion.chunk" if self.chat else "text_completion",
                          [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        """The `include_usage` chunk that ends a stream: no choices, only usage."""
        body = self._body("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(self.prompt_tokens, completion_tokens)
        return body

    def full(self, text: str, finish: str | None, completion_tokens: int, ids: Sequence[int],
             lps: Sequence[float]) -> dict[str, Any]:
        """The non-streamed response."""
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=self._logprobs(ids, lps), finish_reason=finish)
        body = self._body("chat.completion" if self.chat else "text_completion", [choice])
        body["usage"] = usage(self.prompt_tokens, completion_tokens)
        return body


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` that documents a route's JSON body. The handlers read the raw request
    (to answer every error in the OpenAI format), so FastAPI cannot see the model; the
    schema is inlined so that it stands alone in /openapi.json."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline(schema)}}}}
