"""Builds the Serve application: the router (HTTP + gRPC ingress, scheduler leader) bound to
the compute replicas (each with its prefetch worker). `import_path`-style entry for YAML
deployments (KubeRay `serveConfigV2`): `alignedserve.deployments.app:build`; `start` and
`stop` run it on a local or joined Ray cluster (the CLI, benchmarks and tests)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ray import serve
from ray.serve import Application

from alignedserve.config import ServeConfig, load_config
from alignedserve.deployments.replica.compute_replica import WORKER_STOP_S, ComputeReplica
from alignedserve.deployments.router.router import Router
from alignedserve.ports import free_port

log = logging.getLogger("alignedserve.app")
APP_NAME = "alignedserve"
GRPC_SERVICER = "alignedserve.deployments.router.grpc_servicer.add_servicer_to_server"
# Serve's controller loop period on the Ray clusters we start, and in the Helm chart's pods.
SERVE_LOOP_ENV, SERVE_LOOP_S = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5"
# Ray's log monitor globs the log folder for new files on every pass (10 a second while
# it has fewer than 1,000 files); these make it look every 5 s. It still reads the files
# it has every pass. Idle server, 30 s windows: 1.0% -> 0.4% of a core (BENCHMARKS.md,
# issue 12, thirteenth session). New workers' logs reach it up to 5 s later.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
                   "LOG_NAME_UPDATE_INTERVAL_S": "5"}


def replica_stop_s(cfg: ServeConfig) -> float:
    """How long Serve gives a compute replica to stop: its drain, then its prefetch
    worker's stop. Whoever waits for the whole app to stop must wait at least this long."""
    return cfg.drain_timeout_s + WORKER_STOP_S


def build_app(cfg: ServeConfig, model_dir: str) -> Application:
    compute = serve.deployment(
        ComputeReplica, name="ComputeReplica", num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus,
                           "resources": dict(cfg.replica_resources)},
        max_ongoing_requests=16, health_check_period_s=2,
        graceful_shutdown_timeout_s=replica_stop_s(cfg),
    ).bind(cfg, model_dir)
    router = serve.deployment(
        Router, name="Router", num_replicas=cfg.num_routers,
        ray_actor_options={"num_cpus": cfg.router_cpus,
                           "resources": dict(cfg.router_resources)},
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


def init_ray(cfg: ServeConfig) -> bool:
    """Connect to `cfg.ray_address`, or start a local Ray. True if this call started one
    whose router serves clients itself (direct ingress, `ray_serve_env`): pass it on to
    `start`. Nothing happens if Ray is already initialized."""
    import ray

    from alignedserve.deployments.grpc_bind import HOST_ENV

    if ray.is_initialized():
        return False
    if cfg.ray_address is not None:
        ray.init(address=cfg.ray_address, log_to_driver=False)
        return False
    # Serve's controller reconciles every 0.1 s by default: 2.7% of a core under load on a
    # 2-core node, where every bit of CPU beside the model stalls its two-thread steps;
    # 0.5 s halves that (BENCHMARKS.md, issue 12, seventh session). A value set by the user
    # wins. The local Ray's processes inherit these; this process's environment is restored.
    env = {SERVE_LOOP_ENV: os.environ.get(SERVE_LOOP_ENV, SERVE_LOOP_S),
           **{k: os.environ.get(k, v) for k, v in LOG_MONITOR_ENV.items()},
           **ray_serve_env(cfg)}
    # Serve's gRPC proxy (and a direct-ingress router) listens on `host` too, not on every
    # interface.
    hook = {"worker_process_setup_hook": "alignedserve.deployments.grpc_bind.bind_grpc_to_host",
            "env_vars": {HOST_ENV: cfg.host}}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env=hook)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"


def ray_serve_env(cfg: ServeConfig) -> dict[str, str]:
    """Serve's settings for `cfg.ingress` on a Ray we start (its processes read them when
    they import Serve). Direct: the router replica gets host:http_port (and grpc_port) as
    the only port of each range; a restarted router gets it back at once (no quarantine),
    and a stopping one waits only for its open requests (no load balancer to leave).
    With gRPC off Serve allocates no gRPC port, so its gRPC range is left at its default."""
    if not cfg.direct_ingress:
        return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_PORT_QUARANTINE_S": "0",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(cfg.http_port),
           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(cfg.http_port + 1)}
    if cfg.grpc_port:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(cfg.grpc_port)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(cfg.grpc_port + 1)
    return env


def start(cfg: ServeConfig, model_dir: str, direct_ingress: bool = False) -> None:
    """Claim the queue, start Ray (if needed) and run the app; returns once it is deployed
    and healthy. Raises ValueError if a live deployment already uses the queue.
    `direct_ingress`: what the caller's own `init_ray` returned (`cfg.ingress` applies
    only to a Ray started so)."""
    import redis
    from ray import serve
    from ray.serve.config import gRPCOptions

    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.records import claim_queue

    removed = claim_queue(redis.Redis.from_url(cfg.redis_url), RedisKeys(cfg.redis_prefix),
                          cfg.replica_timeout_s)
    if removed:
        log.warning("removed %d keys under %r left by a deployment that stopped uncleanly",
                    removed, cfg.redis_prefix)
    direct = init_ray(cfg) or direct_ingress
    if cfg.ray_address is None:
        check_fits(cfg)
    if cfg.ray_address is None and cfg.kv_grpc_host is None:
        # A cluster of this one machine: its stores need not be reachable from anywhere else.
        cfg = cfg.model_copy(update={"kv_grpc_host": "127.0.0.1"})
    http_port, grpc_port = cfg.http_port, cfg.grpc_port
    if direct:  # the router listens on cfg's ports; the proxy Serve still starts, elsewhere
        # Serve's proxy binds these later: ports outside the ranges Ray and the kernel
        # hand out, so no process Ray starts meanwhile takes one (`alignedserve.ports`).
        http_port, grpc_port = free_port(), grpc_port and free_port()
    grpc = (gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
            if grpc_port else None)
    serve.start(http_options={"host": cfg.host, "port": http_port},
                grpc_options=grpc, proxy_location=cfg.proxy_location)
    serve.run(build_app(cfg, model_dir), name=APP_NAME, route_prefix="/")


def check_fits(cfg: ServeConfig) -> None:
    """On a Ray this process started (nothing will be added to it), the app's CPU
    reservations must fit, or Serve waits forever for the replicas it cannot place.
    Raises ValueError naming the knobs. A joined cluster may still grow: not checked."""
    import ray

    need = (cfg.num_replicas * (cfg.replica_cpus + cfg.worker_cpus)
            + cfg.num_routers * cfg.router_cpus)
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have + 1e-6:
        raise ValueError(
            f"{cfg.num_replicas} compute replica(s) x (replica_cpus {cfg.replica_cpus} + "
            f"worker_cpus {cfg.worker_cpus}) + {cfg.num_routers} router(s) x router_cpus "
            f"{cfg.router_cpus} = {need:g} Ray CPUs, but this machine's Ray has {have:g}: "
            "lower replica_cpus / worker_cpus (they are reservations, not threads; "
            "replica_threads sets those) or num_replicas")


def stop() -> None:
    """Delete the app (Serve drains: routers finish open requests, replicas their batches)
    and shut Serve down."""
    from ray import serve

    from alignedserve.kv_store.shm_arena import remove_orphans
    from alignedserve.kv_store.store import close_stores

    serve.delete(APP_NAME)
    serve.shutdown()
    close_stores()  # after the replicas: their drain may still free KV
    remove_orphans()  # of replicas that died during the run
