"""Builds the Serve application: the router (HTTP + gRPC ingress, scheduler leader) bound to
the compute replicas (each with its prefetch worker). `import_path`-style entry for YAML
deployments (KubeRay `serveConfigV2`): `alignedserve.deployments.app:build`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from alignedserve.config import ServeConfig, load_config
from alignedserve.deployments.compute_replica import ComputeReplica
from alignedserve.deployments.router import Router

APP_NAME = "alignedserve"
GRPC_SERVICER = "alignedserve.deployments.grpc_servicer.add_servicer_to_server"


def build_app(cfg: ServeConfig, model_dir: str) -> Application:
    compute = serve.deployment(
        ComputeReplica, name="ComputeReplica", num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        max_ongoing_requests=16, health_check_period_s=10,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s + 15,
    ).bind(cfg, model_dir)
    router = serve.deployment(
        Router, name="Router", num_replicas=cfg.num_routers,
        ray_actor_options={"num_cpus": cfg.router_cpus},
        # Queueing happens in Redis and the engines, not in Serve (as in Ray Serve LLM).
        max_ongoing_requests=100_000,
        graceful_shutdown_wait_loop_s=1.0,
        graceful_shutdown_timeout_s=cfg.drain_timeout_s,
    )
    return router.bind(cfg, model_dir, compute)


def build(args: dict[str, Any]) -> Application:
    """Serve config-file builder: `args` are ServeConfig fields (plus `config`: a YAML path).
    The model must already be a folder on every node (the Helm chart mounts it)."""
    args = dict(args)
    cfg = load_config(args.pop("config", None), **args)
    return build_app(cfg, cfg.model)
