"""The proxy-side `Generate` wrapper (deployments/grpc_servicer.py) with a fake handler and
context: a call that ends before its stream did is aborted, one that ends after is not."""

from __future__ import annotations

import asyncio

from alignedserve.deployments.protos import alignedserve_pb2 as pb
from alignedserve.deployments.router.grpc_servicer import abort_on_cancel


class FakeContext:
    def __init__(self) -> None:
        self.callbacks = []
        self.done = False

    def invocation_metadata(self):
        assert not self.done, "read after the call ended (grpc segfaults here)"
        return (("application", "alignedserve"), ("request_id", "serve-1"))

    def peer(self):
        assert not self.done
        return "ipv4:127.0.0.1:5555"

    def add_done_callback(self, cb) -> None:
        self.callbacks.append(cb)

    def finish(self) -> None:  # what gRPC does when the RPC ends, however it ends
        self.done = True
        for cb in self.callbacks:
            cb(self)


def _wrapped(n_messages: int, aborted: list[str]):
    async def generate(request, context):
        for i in range(n_messages):
            await asyncio.sleep(0)
            yield f"{request.request_id}:{i}"

    async def abort(request, context):
        # The abort goes to the same application, under a Serve request id of its own.
        assert dict(context.invocation_metadata()) == {"application": "alignedserve"}
        context.set_code(0)
        aborted.append(request.request_id)

    return abort_on_cancel(generate, abort)


def test_a_stream_that_ends_by_itself_is_not_aborted():
    async def main():
        aborted: list[str] = []
        ctx = FakeContext()
        got = [m async for m in _wrapped(3, aborted)(pb.GenerateRequest(request_id="a"), ctx)]
        ctx.finish()
        await asyncio.sleep(0.01)
        return got, aborted

    got, aborted = asyncio.run(main())
    assert got == ["a:0", "a:1", "a:2"] and aborted == []


def test_a_call_that_ends_mid_stream_aborts_its_request_even_if_never_closed():
    async def main():
        aborted: list[str] = []
        ctx = FakeContext()
        stream = _wrapped(100, aborted)(pb.GenerateRequest(), ctx)
        first = await stream.__anext__()  # then the client goes; the generator stays open
        ctx.finish()
        await asyncio.sleep(0.01)
        return first, aborted, stream

    first, aborted, _stream = asyncio.run(main())
    rid = first.split(":")[0]
    assert rid.startswith("grpc-") and aborted == [rid]
