"""The gRPC API (deployments/protos/alignedserve.proto) over the same `OpenAIFrontend`, so
HTTP and gRPC validate, tokenize, stream text and abort identically. Ray Serve's gRPC proxy
calls these methods by RPC name on the ingress deployment; a cancelled call (client gone)
aborts the request like an HTTP disconnect."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from alignedserve.deployments.protos import alignedserve_pb2 as pb
from alignedserve.deployments.router.backend import TokenEvent
from alignedserve.deployments.router.openai_api import OpenAIFrontend
from alignedserve.deployments.router.openai_protocol import (
    APIError,
    CompletionRequest,
    parse_request,
    to_sampling_params,
)
from alignedserve.logs import rid as log_rid
from alignedserve.scheduling.sampling_params import SamplingParams

log = logging.getLogger("alignedserve.router")

# Optional proto fields that map one to one onto the OpenAI completion request's.
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
             "skip_special_tokens")


def _params(request: pb.GenerateRequest, model: str, ids: list[int],
            max_model_len: int) -> SamplingParams:
    """The proto's sampling params through the HTTP path's validation (same defaults, same
    400s): max_tokens defaults to the rest of the context."""
    sp = request.sampling
    body = {"model": model, "prompt": ids, "stop": list(sp.stop),
            "stop_token_ids": list(sp.stop_token_ids), "ignore_eos": sp.ignore_eos,
            "logprobs": 1 if sp.logprobs else None,
            **{name: getattr(sp, name) for name in _OPTIONAL if sp.HasField(name)}}
    return to_sampling_params(parse_request(CompletionRequest, body), len(ids), max_model_len)


def _responses(rid: str, prompt_tokens: int, delta: str,
               ev: TokenEvent) -> list[pb.GenerateResponse]:
    out = []
    if ev.token_ids or delta:
        out.append(pb.GenerateResponse(request_id=rid, chunk=pb.Chunk(
            token_ids=list(ev.token_ids), text=delta, prompt_tokens=prompt_tokens,
            completion_tokens=ev.num_output_tokens, logprobs=list(ev.logprobs or ()))))
    if ev.finish_reason:
        out.append(pb.GenerateResponse(request_id=rid, complete=pb.Complete(
            finish_reason=ev.finish_reason, usage=pb.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=ev.num_output_tokens))))
    return out


def _error(rid: str, message: str, code: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=rid, error=pb.Error(message=message, code=code))


# HTTP-equivalent status -> the call's gRPC status (vLLM's and SGLang's mapping).
_STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
           404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
           503: grpc.StatusCode.UNAVAILABLE}


def _fail(context: Any, status: int, message: str) -> None:
    """Give the call a non-OK status (Serve copies it onto the client's call)."""
    if context is not None:
        context.set_code(_STATUS.get(status, grpc.StatusCode.INTERNAL))
        context.set_details(message)


def _authorize(f: OpenAIFrontend, context: Any) -> None:
    metadata = dict(context.invocation_metadata()) if context is not None else {}
    f.authorize(metadata.get("authorization"))


class GrpcApiMixin:
    """Mixed into the Serve router; needs `self.frontend: OpenAIFrontend`."""

    frontend: OpenAIFrontend

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any = None
                       ) -> AsyncIterator[pb.GenerateResponse]:
        """Chunks, then one Complete; or one Error with its HTTP-equivalent code, and the
        call ends with the matching status (INVALID_ARGUMENT for bad input, UNAUTHENTICATED,
        RESOURCE_EXHAUSTED when the queue is full, INTERNAL if the backend failed).
        Cancelling the call aborts the request."""
        f = self.frontend
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            _authorize(f, grpc_context)
            if request.HasField("token_ids"):
                ids = f.check_ids(list(request.token_ids.ids), "token_ids")
            else:
                ids = f.check_ids(f.tokenizer.encode(request.text), "text")
            gen = await f.start(rid, ids, _params(request, f.model_name, ids,
                                                  f.max_model_len))
            async with aclosing(f.run(gen)) as events:
                async for delta, ev in events:
                    for msg in _responses(rid, len(ids), delta, ev):
                        yield msg
        except APIError as e:
            _fail(grpc_context, e.status, e.message)
            yield _error(rid, e.message, e.status)
        except Exception as e:  # reported like HTTP's in-stream error, never a bare failure
            log.exception("gRPC Generate failed", extra=log_rid(rid))
            message = f"internal error: {type(e).__name__}: {e}"
            _fail(grpc_context, 500, message)
            yield _error(rid, message, 500)

    async def Abort(self, request: pb.AbortRequest, grpc_context: Any = None
                    ) -> pb.AbortResponse:
        try:
            _authorize(self.frontend, grpc_context)
        except APIError as e:
            _fail(grpc_context, e.status, e.message)
            return pb.AbortResponse(accepted=False)
        await self.frontend.backend.abort(request.request_id)
        return pb.AbortResponse(accepted=True)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        """Healthy once a compute replica is up and the queue answers (HTTP /health's
        readiness)."""
        try:
            info = await self.frontend.backend.server_info()
        except APIError:
            return pb.HealthResponse(healthy=False)
        return pb.HealthResponse(healthy=bool(info.get("replicas", 1)))

    async def ServerInfo(self, request: pb.ServerInfoRequest, grpc_context: Any = None
                         ) -> pb.ServerInfoResponse:
        f = self.frontend
        try:
            _authorize(f, grpc_context)
        except APIError as e:
            _fail(grpc_context, e.status, e.message)
            return pb.ServerInfoResponse()
        info = await f.backend.server_info()
        return pb.ServerInfoResponse(model=f.model_name, active_requests=f.active,
                                     uptime_s=time.time() - f.started,
                                     max_model_len=f.max_model_len,
                                     backend_json=json.dumps(info, default=str))
