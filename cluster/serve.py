"""`alignedserve serve` and `alignedserve status`: local bootstrap (Redis, Ray, Serve).

serve: prepare the model, start Redis if the URL is loopback and silent, start local Ray (or
join `ray_address`), run the Serve app on `host:http_port` (HTTP) and `host:grpc_port`
(gRPC), print how to call it, and on SIGINT/SIGTERM drain and shut everything down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

from alignedserve.config import ServeConfig, load_config
from alignedserve.global_queue.nodes import STAGES
from alignedserve.global_queue.redis_server import LocalRedis
from alignedserve.logs import configure_logging

# Flags of `serve` (each overrides the config file and the environment); ServeConfig
# documents every field.
SERVE_FLAGS: tuple[tuple[str, type], ...] = (
    ("--model", str), ("--served-model-name", str), ("--host", str), ("--http-port", int),
    ("--grpc-port", int), ("--redis-url", str), ("--ray-address", str), ("--kv-grpc-port", int),
    ("--num-replicas", int), ("--num-routers", int), ("--host-kv-gib", float),
    ("--drain-timeout-s", float), ("--api-key", str), ("--max-queued-requests", int),
)


def add_serve_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="Serve the OpenAI HTTP and gRPC APIs on Ray Serve.")
    serve.add_argument("--config", default=None, help="YAML file of ServeConfig fields.")
    for flag, kind in SERVE_FLAGS:
        field = flag.removeprefix("--").replace("-", "_")
        desc = ServeConfig.model_fields[field].description
        serve.add_argument(flag, type=kind, default=None, help=desc)
    serve.set_defaults(func=_cmd_serve)
    status = sub.add_parser("status", help="Replicas, queue depths, pool usage, alignment.")
    status.add_argument("--config", default=None, help="YAML file of ServeConfig fields.")
    status.add_argument("--redis-url", default=None, help="The deployment's Redis.")
    status.add_argument("--json", action="store_true", help="Print JSON.")
    status.set_defaults(func=_cmd_status)
    for name, helptext in (("cordon", "Keep a stage off a node (maintenance, or to move "
                            "decode elsewhere); work already there finishes."),
                           ("uncordon", "Let a node take every stage again.")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("node", help="Ray node id (a unique prefix will do; see `status`).")
        if name == "cordon":
            p.add_argument("--stage", choices=STAGES, default="all",
                           help="decode: its replicas get no new requests; prefill: its "
                           "workers claim no new prompts; all: both.")
        else:
            p.set_defaults(stage=None)
        p.add_argument("--config", default=None, help="YAML file of ServeConfig fields.")
        p.add_argument("--redis-url", default=None, help="The deployment's Redis.")
        p.set_defaults(func=_cmd_cordon)


def _flags(args: argparse.Namespace) -> dict[str, object]:
    names = [f.removeprefix("--").replace("-", "_") for f, _ in SERVE_FLAGS]
    return {n: getattr(args, n, None) for n in names}


def resolve_model(model: str) -> str:
    """A model folder, preparing a built-in name (e.g. smollm2-135m) on first use."""
    if Path(model).is_dir():
        return str(Path(model).resolve())
    from alignedserve.model_zoo.model_builder import MODEL_NAMES, ensure_model

    if model not in MODEL_NAMES:
        raise ValueError(f"model {model!r} is neither a folder nor one of {list(MODEL_NAMES)}")
    return str(ensure_model(model))


def _cmd_serve(args: argparse.Namespace) -> int:
    from alignedserve.deployments import app

    cfg = load_config(args.config, **_flags(args))
    configure_logging(cfg.log_level)
    model_dir = resolve_model(cfg.model)
    cfg = cfg.model_copy(update={"served_model_name": cfg.served_model_name or
                                 Path(cfg.model).name})
    done = threading.Event()
    redis_srv = LocalRedis(cfg.redis_url) if cfg.start_redis else None
    if redis_srv is not None:
        redis_srv.start()
    stopped = True
    try:
        direct_ingress = app.init_ray(cfg)
        # After ray.init, whose native handler would otherwise end the process at once on
        # SIGTERM, skipping the drain. A signal during start-up drains once it is up.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        app.start(cfg, model_dir, direct_ingress)
        # The local Ray cluster and Redis. Taken now as well as at the drain: a signal to
        # the whole process group can end the raylet first, and its workers (the KV store
        # among them) are then no longer our descendants when the drain looks.
        started = psutil.Process().children(recursive=True)
        _print_usage(cfg)
        done.wait()
        print("draining...", flush=True)
        ours = list({*started, *psutil.Process().children(recursive=True)})
        core = [p for p in ours if _name(p) in ("gcs_server", "raylet")]
        drained = threading.Event()  # after it, ray.shutdown ends the GCS itself
        # Serve may take a compute replica's whole stop budget (a replacement replica
        # still starting after a node died took 8 s to stop).
        budget = app.replica_stop_s(cfg) + _STOP_MARGIN_S
        stopped = _stop_within(lambda: _stop_all(drained), budget,
                               gave_up=lambda: not drained.is_set() and
                               any(not _running(p) for p in core))
        if not stopped and cfg.ray_address is not None:
            print(f"the app did not stop within {budget:g} s; exiting (the joined Ray "
                  "cluster keeps running)", flush=True)
        if not stopped and cfg.ray_address is None:
            # SIGTERM to the whole process group (docker stop, systemd) reaches the local
            # Ray cluster's processes too: Serve cannot drain without its GCS, and
            # ray.shutdown would wait a minute for it. The cluster is ours: end it.
            print("Ray's processes were stopped under the server (a signal to the whole "
                  "process group?); ending the local cluster without a drain", flush=True)
            for p in ours:
                with contextlib.suppress(psutil.Error):
                    if "redis-server" not in _name(p):
                        p.kill()
        _reap_arenas({p.pid for p in ours})
    finally:
        if redis_srv is not None:
            redis_srv.stop()
    if not stopped:
        os._exit(1)  # not through ray.shutdown: there is no GCS to wait for
    return 0


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_all(drained: threading.Event) -> None:
    import ray

    from alignedserve.deployments import app

    app.stop()
    drained.set()
    ray.shutdown()  # a local cluster's processes end here, not at interpreter exit


def _reap_arenas(ours: set[int], timeout_s: float = 5.0) -> None:
    """Unlink the shared-memory arenas our processes (the local Ray cluster's) created
    once they are gone: a killed KV store cannot unlink its own."""
    from alignedserve.kv_store.shm_arena import arena_owners, remove_orphans

    deadline = time.monotonic() + timeout_s
    while True:
        remove_orphans()
        left = [n for n, pid in arena_owners().items() if pid in ours]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if left:
        print(f"shared memory still held by live processes: {', '.join(left)}", flush=True)


_STOP_MARGIN_S = 5.0  # past a compute replica's stop budget, for Serve and Ray to stop


def _stop_within(stop, timeout_s: float, gave_up=lambda: False) -> bool:
    """Run `stop` (the drain and shutdown) on a daemon thread; False if it failed, did not
    return in time, or `gave_up()` turned true meanwhile (it is then abandoned)."""
    ok = threading.Event()

    def run() -> None:
        try:
            stop()
            ok.set()
        except Exception:
            logging.getLogger("alignedserve.serve").exception("stopping failed")

    t = threading.Thread(target=run, name="stop", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout_s
    while t.is_alive() and time.monotonic() < deadline and not gave_up():
        t.join(0.2)
    return ok.is_set()


def _print_usage(cfg: ServeConfig) -> None:
    base = f"http://{cfg.host}:{cfg.http_port}"
    grpc = (f"{cfg.host}:{cfg.grpc_port} (service alignedserve.v1.AlignedServe, metadata\n"
            "               application=alignedserve)" if cfg.grpc_port else
            "off (grpc_port 0)")
    print(f"""
AlignedServe is serving {cfg.model_name!r} ({cfg.num_replicas} compute replica(s), each with
a prefetch worker).
  OpenAI HTTP: {base}/v1   (health {base}/health, metrics {base}/metrics)
  gRPC:        {grpc}
Try:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{cfg.model_name}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
  alignedserve status
Ctrl-C drains and stops.""", flush=True)


def status_snapshot(redis_url: str, prefix: str) -> dict[str, object]:
    from dataclasses import asdict

    import redis

    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.nodes import load_stores
    from alignedserve.global_queue.records import load_states

    r = redis.Redis.from_url(redis_url)
    keys = RedisKeys(prefix)
    now = time.time()
    replicas = [asdict(s) for s in load_states(r, keys)]
    stores = [asdict(s) for s in load_stores(r, keys)]
    for item in replicas + stores:
        item["age_s"] = round(now - item.pop("ts"), 2)
    cordons = {k.decode(): v.decode() for k, v in r.hgetall(keys.cordon).items()}
    for st in stores:
        st["replicas"] = sorted(rep["replica"] for rep in replicas if rep["node"] == st["node"])
        st["cordoned"] = cordons.get(st["node"])
    holder = r.get(keys.leader)
    counters = {k.decode(): int(v) for k, v in r.hgetall(keys.counters).items()}
    return {"prefill_queue": r.llen(keys.prefill), "decode_index": r.zcard(keys.decode),
            "leader_held": holder is not None, "resumed_requests": counters.get("resumed", 0),
            "cross_node_pulls": counters.get("kv_remote_pulls", 0),
            "cross_node_kv_bytes": counters.get("kv_remote_bytes", 0),
            "replicas": replicas, "nodes": stores}


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, redis_url=args.redis_url)
    snap = status_snapshot(cfg.redis_url, cfg.redis_prefix)
    if args.json:
        print(json.dumps(snap, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"prefill queue {snap['prefill_queue']}, decode index "
                  f"{snap['decode_index']}, leader {'held' if snap['leader_held'] else 'none'}, "
                  f"requests resumed after a replica died {snap['resumed_requests']}, "
                  f"cross-node KV pulls {snap['cross_node_pulls']} "
                  f"({snap['cross_node_kv_bytes'] / 2**20:.1f} MiB)")
    nodes = Table("node", "KV store (gRPC)", "store blocks used", "requests", "served to "
                  "other nodes", "replicas", "cordoned", "age s")
    for st in snap["nodes"]:
        nodes.add_row(st["node"][:12], st["address"], f"{st['used_blocks']}/{st['num_blocks']}",
                      str(st["num_requests"]), f"{st['bytes_served'] / 2**20:.1f} MiB",
                      ", ".join(st["replicas"]) or "-", st["cordoned"] or "-",
                      str(st["age_s"]))
    console.print(nodes)
    table = Table("replica", "node", "prefill", "requests", "running", "pooled", "KV usage",
                  "prefetch hits", "batch switches", "state age s")
    for rep in snap["replicas"]:
        hit = rep.get("prefetch_hit_rate")
        table.add_row(rep["replica"], rep["node"][:12], rep["prefill"], str(rep["requests"]),
                      str(rep["running"]),
                      str(rep["pooled"]), f"{rep['kv_usage']:.0%}",
                      "-" if hit is None else f"{hit:.0%}", str(rep["switches"]),
                      str(rep["age_s"]))
    console.print(table)
    return 0


def _cmd_cordon(args: argparse.Namespace) -> int:
    import redis

    from alignedserve.global_queue.keys import RedisKeys
    from alignedserve.global_queue.nodes import cordon, load_stores, uncordon

    cfg = load_config(args.config, redis_url=args.redis_url)
    r = redis.Redis.from_url(cfg.redis_url)
    keys = RedisKeys(cfg.redis_prefix)
    known = {s.node for s in load_stores(r, keys)} | {
        k.decode() for k in r.hkeys(keys.cordon)}
    match = sorted(n for n in known if n.startswith(args.node))
    if len(match) != 1:
        print(f"{args.node!r} matches {len(match)} known nodes: {', '.join(match) or 'none'}",
              file=sys.stderr)
        return 2
    if args.stage is not None:
        cordon(r, keys, match[0], args.stage)
        print(f"node {match[0]}: {args.stage} cordoned")
    else:
        uncordon(r, keys, match[0])
        print(f"node {match[0]}: uncordoned")
    return 0
