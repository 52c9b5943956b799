"""Serve's gRPC proxy listens on `[::]:<grpc_port>`, all interfaces: Ray Serve 2.60
hard-codes the host (`ray.serve._private.grpc_util.start_grpc_server`). A server started on
one machine must listen where its config says (`host`, 127.0.0.1 by default), as the HTTP
proxy does. `init_ray` installs `bind_grpc_to_host` as the job's worker setup hook when it
starts a local Ray: in every worker (the proxies among them, and a router replica that
serves gRPC itself under `ingress: direct`) it makes the address Serve's gRPC server adds
use `ALIGNEDSERVE_GRPC_HOST` instead of `[::]`. On a cluster that Ray was started for
by someone else (KubeRay) the proxies are not ours to patch, and listening on the pod's
interfaces is what a Service needs there.
"""

from __future__ import annotations

import os

HOST_ENV = "ALIGNEDSERVE_GRPC_HOST"


def bind_grpc_to_host() -> None:
    host = os.environ.get(HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl

    add = default_impl.add_grpc_address
    if getattr(add, "_alignedserve", False):
        return

    def add_grpc_address(server, address: str):
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return add(server, address)

    add_grpc_address._alignedserve = True  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address
