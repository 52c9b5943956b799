"""The router deployment: the OpenAI HTTP ingress (FastAPI) and the gRPC service, over the
Redis global queue; one router replica at a time is also the scheduler leader.

The HTTP and gRPC behaviour lives in `OpenAIFrontend` and `GrpcApiMixin`; this class only
wires them to the Redis backend, the KV store and the leader loop.
"""

# No `from __future__ import annotations` here: Serve's ingress rebinds these methods, and
# FastAPI must see the real `Request` class in their signatures, not a string.
import asyncio
import os

import ray
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from ray import serve

from alignedserve.config import ServeConfig
from alignedserve.deployments.limits import serving_limits
from alignedserve.deployments.liveness import actors_alive
from alignedserve.deployments.metrics import FrontendMetrics, prometheus_text
from alignedserve.deployments.router.grpc_api import GrpcApiMixin
from alignedserve.deployments.router.leader import LeaderLoop
from alignedserve.deployments.router.openai_api import (
    CHAT_BODY,
    COMPLETIONS_BODY,
    OpenAIFrontend,
    install_error_handlers,
)
from alignedserve.deployments.router.redis_backend import RedisBackend
from alignedserve.global_queue.keys import RedisKeys
from alignedserve.logs import configure_logging
from alignedserve.niceness import set_process_nice
from alignedserve.ports import wait_until_bindable
from alignedserve.scheduling.dispatch import DispatchKnobs, dispatch_align_by

PORT_WAIT_S = 90.0  # longer than Linux's TIME_WAIT (60 s)

app = FastAPI(title="AlignedServe", description="OpenAI-compatible LLM serving with "
              "prefix-aware batching.")
install_error_handlers(app)


@serve.ingress(app)
class Router(GrpcApiMixin):
    def __init__(self, cfg: ServeConfig, model_dir: str, compute: object) -> None:
        from alignedserve.engine.tokenizer import load_tokenizer
        from alignedserve.kv_store.store import StoreDirectory

        configure_logging(cfg.log_level)
        self.cfg = cfg
        if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
            # Serve binds this replica's one port right after this constructor; a port
            # still held by the previous router's connections would be blocked for good.
            for port in (cfg.http_port, cfg.grpc_port):
                if port:
                    wait_until_bindable(cfg.host, port, PORT_WAIT_S)
        self.node = ray.get_runtime_context().get_node_id()
        self.compute = compute  # the ComputeReplica deployment's handle (keeps it deployed)
        keys = RedisKeys(cfg.redis_prefix)
        limits = serving_limits(cfg, model_dir)
        stores = StoreDirectory()  # requests' KV is freed in whichever node's store has it
        self.backend = RedisBackend(
            cfg.redis_url, keys, stores.free, cfg.replica_timeout_s,
            limits.max_queued_requests, lambda st: actors_alive(st.actors, st.namespace),
            cfg.redis_outage_s)
        self.frontend = OpenAIFrontend(self.backend, load_tokenizer(model_dir), cfg.model_name,
                                       limits.max_model_len, limits.vocab_size,
                                       FrontendMetrics(cfg.model_name),
                                       cfg.api_key.get_secret_value() if cfg.api_key else None)
        e = cfg.engine
        knobs = DispatchKnobs(e.max_spread, e.slack_tokens, e.max_queue_delay_s,
                              align_by=dispatch_align_by(e.align_by, cfg.replica_gpus))
        self.leader = LeaderLoop(cfg.redis_url, keys, cfg.leader_ttl_s, knobs, stores.free,
                                 outage_s=cfg.redis_outage_s,
                                 router_id=self.backend.router_id).start()
        if cfg.compute_nice is not None:  # last: the leader's thread and Serve's are up
            # Admission and token streaming at the model steps' priority, not behind them
            # (Ray's 15): at 15 beside steps at 0, TTFT p50 doubled (BENCHMARKS.md, issue 12).
            set_process_nice(cfg.compute_nice, "router")

    @app.post("/v1/completions", openapi_extra=COMPLETIONS_BODY)
    async def completions(self, request: Request) -> Response:
        return await self.frontend.completions(request)

    @app.post("/v1/chat/completions", openapi_extra=CHAT_BODY)
    async def chat_completions(self, request: Request) -> Response:
        return await self.frontend.chat_completions(request)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self.frontend.models(request)

    @app.get("/health")
    async def health(self) -> Response:
        return await self.frontend.health()

    @app.get("/metrics")
    async def metrics(self) -> Response:
        text = await asyncio.get_running_loop().run_in_executor(None, prometheus_text)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/status")
    async def status(self) -> dict[str, object]:
        info = await self.backend.server_info()
        info["leader"] = self.leader.is_leader
        info["node"] = self.node  # the Ray node this router runs on
        return info

    def __del__(self) -> None:
        self.leader.stop()
