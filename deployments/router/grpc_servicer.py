"""What Serve's gRPC server imports (`gRPCOptions.grpc_servicer_functions`): registers the
AlignedServe service and makes a cancelled `Generate` call abort its request.

Runs in Serve's proxy process, or in the router replica when that serves gRPC itself
(`ingress: direct`); the abort goes back through the same server. Why it exists: Ray Serve
2.60's proxy cancels the replica's streaming call only when the client's cancel lands while
the proxy awaits the replica's next message. When it lands while the proxy is writing a
message to the client (a few percent to a quarter of the time, depending on how fast tokens
come), the proxy drops its generators without cancelling the replica call, and the request
runs to completion for nobody. This wrapper sees every way a `Generate` call ends and,
unless the stream ended by itself, sends `Abort` for the request id through the proxy's own
`Abort` route, so the request stops and its KV is freed wherever it is.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from alignedserve.deployments.protos import alignedserve_pb2 as pb
from alignedserve.deployments.protos import alignedserve_pb2_grpc as pbg

log = logging.getLogger("alignedserve.grpc")

SERVICE = "alignedserve.v1.AlignedServe"
GENERATE = f"/{SERVICE}/Generate"
ABORT = f"/{SERVICE}/Abort"


def add_servicer_to_server(servicer: Any, server: Any) -> None:
    """`add_AlignedServeServicer_to_server`, with `Generate` aborting on cancel."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:  # not Serve's generic server: nothing to fix
        pbg.add_AlignedServeServicer_to_server(servicer, server)
        return
    server.service_handler_factory = _abort_on_cancel_factory(factory)
    try:
        pbg.add_AlignedServeServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory


def _abort_on_cancel_factory(factory: Callable[..., Any]) -> Callable[..., Any]:
    def make(*, service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if service_method != GENERATE or getattr(streaming_type, "name", "") != "UNARY_STREAM":
            return handler
        abort = factory(service_method=ABORT, streaming_type=type(streaming_type).UNARY_UNARY)
        return abort_on_cancel(handler, abort)

    return make


def abort_on_cancel(generate: Callable[..., AsyncIterator[Any]],
                    abort: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap the proxy's `Generate` handler: give the request an id if the client sent none
    (so it can be aborted), and abort it when the call ends before its stream did. The
    check runs in the RPC's done callback, which gRPC calls however the call ends (the
    wrapper's own generator may be left suspended, and is only closed by the GC)."""
    pending: set[asyncio.Task] = set()  # aborts in flight (the loop keeps only weak refs)

    async def handler(request: pb.GenerateRequest, context: Any) -> AsyncIterator[Any]:
        if not request.request_id:
            request.request_id = f"grpc-{uuid.uuid4().hex}"
        rid = request.request_id
        ended = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The abort must not touch this call's context once the call is over (grpc's
        # context segfaults when read after the RPC ended): it gets a copy made now.
        abort_context = _DetachedContext(context)

        def on_done(_: Any) -> None:
            if not ended.is_set():
                task = loop.create_task(_abort(abort, rid, abort_context))
                pending.add(task)
                task.add_done_callback(pending.discard)

        context.add_done_callback(on_done)
        async for message in generate(request, context):
            yield message
        ended.set()

    return handler


class _DetachedContext:
    """What Serve's proxy reads and writes of a gRPC servicer context, copied from a live
    call (its metadata routes the abort to the same application), detached from it."""

    def __init__(self, live: Any) -> None:
        self._metadata = tuple((k, v) for k, v in live.invocation_metadata()
                               if k != "request_id")  # the abort gets its own Serve id
        self._peer = live.peer()
        self._code: Any = None
        self._details: str | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, Any]:
        return {}

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def code(self) -> Any:
        return self._code

    def set_code(self, code: Any) -> None:
        self._code = code

    def details(self) -> str | None:
        return self._details

    def set_details(self, details: str) -> None:
        self._details = details

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, _: Any) -> None:
        pass

    def set_compression(self, _: Any) -> None:
        pass


async def _abort(abort: Callable[..., Any], rid: str, context: Any) -> None:
    try:
        await abort(pb.AbortRequest(request_id=rid), context)
    except Exception:
        log.warning("could not abort cancelled gRPC request %s", rid, exc_info=True)
    else:
        log.info("aborted cancelled gRPC request %s", rid)
