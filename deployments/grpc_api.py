"""The gRPC API (deployments/protos/alignedserve.proto) over the same `OpenAIFrontend`, so
HTTP and gRPC validate, tokenize, stream text and abort identically. Ray Serve's gRPC proxy
calls these methods by RPC name on the ingress deployment; a cancelled call (client gone)
aborts the request like an HTTP disconnect."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from alignedserve.deployments.openai_api import OpenAIFrontend
from alignedserve.deployments.openai_protocol import APIError
from alignedserve.deployments.protos import alignedserve_pb2 as pb
from alignedserve.scheduling.sampling_params import SamplingParams


def _params(sp: pb.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens; the context is {max_model_len}")
    max_tokens = sp.max_tokens if sp.HasField("max_tokens") else room
    if max_tokens > room:
        raise APIError(f"max_tokens is {max_tokens}; at most {room} fit the context",
                       param="max_tokens")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sp.temperature if sp.HasField("temperature") else 1.0,
            top_p=sp.top_p if sp.HasField("top_p") else 1.0,
            top_k=max(0, sp.top_k) if sp.HasField("top_k") else 0,
            min_p=sp.min_p if sp.HasField("min_p") else 0.0,
            seed=sp.seed if sp.HasField("seed") else None, stop=tuple(sp.stop),
            stop_token_ids=tuple(sp.stop_token_ids), ignore_eos=sp.ignore_eos,
            logprobs=sp.logprobs,
            skip_special_tokens=(sp.skip_special_tokens if sp.HasField("skip_special_tokens")
                                 else True))
    except ValueError as e:
        raise APIError(str(e)) from e


class GrpcApiMixin:
    """Mixed into the Serve router; needs `self.frontend: OpenAIFrontend`."""

    frontend: OpenAIFrontend

    async def Generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        f = self.frontend
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            if request.HasField("token_ids"):
                ids = f.check_ids(list(request.token_ids.ids), "token_ids")
            else:
                ids = f.check_ids(f.tokenizer.encode(request.text), "text")
            gen = f.start(rid, ids, _params(request.sampling, len(ids), f.max_model_len))
            async for delta, ev in f.run(gen):
                if ev.token_ids or delta:
                    yield pb.GenerateResponse(request_id=rid, chunk=pb.Chunk(
                        token_ids=list(ev.token_ids), text=delta, prompt_tokens=len(ids),
                        completion_tokens=ev.num_output_tokens,
                        logprobs=list(ev.logprobs or ())))
                if ev.finish_reason:
                    yield pb.GenerateResponse(request_id=rid, complete=pb.Complete(
                        finish_reason=ev.finish_reason, usage=pb.Usage(
                            prompt_tokens=len(ids), completion_tokens=ev.num_output_tokens)))
        except APIError as e:
            yield pb.GenerateResponse(request_id=rid, error=pb.Error(message=e.message,
                                                                     code=e.status))

    async def Abort(self, request: pb.AbortRequest) -> pb.AbortResponse:
        await self.frontend.backend.abort(request.request_id)
        return pb.AbortResponse(accepted=True)

    async def Health(self, request: pb.HealthRequest) -> pb.HealthResponse:
        return pb.HealthResponse(healthy=True)

    async def ServerInfo(self, request: pb.ServerInfoRequest) -> pb.ServerInfoResponse:
        f = self.frontend
        info = await f.backend.server_info()
        return pb.ServerInfoResponse(model=f.model_name, active_requests=f.active,
                                     uptime_s=time.time() - f.started,
                                     max_model_len=f.max_model_len,
                                     backend_json=json.dumps(info, default=str))
