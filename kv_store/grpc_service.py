"""The KV store's gRPC service (kv_store/protos/kv_store.proto), for clients on other nodes.

The server runs inside the store actor on a thread pool and shares the actor's lock; reads
stream one block per message, writes take a client stream. `RemoteKVStoreClient` has the
same read/write API as the same-node `KVStoreClient`, plus allocate/free/stats. Binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from alignedserve.kv_store.core import KVStoreCore
from alignedserve.kv_store.protos import kv_store_pb2 as pb
from alignedserve.kv_store.protos import kv_store_pb2_grpc as pbg

_MAX_MSG = 64 << 20  # bytes per message (one block is far smaller)
_CONNECT_TIMEOUT_S = 5.0  # a store that does not answer Stats this soon is taken as gone
_OPTIONS = [("grpc.max_send_message_length", _MAX_MSG),
            ("grpc.max_receive_message_length", _MAX_MSG)]


def to_bytes(block: torch.Tensor) -> bytes:
    """Raw bytes of one block (any dtype, bf16 included)."""
    return block.contiguous().view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=dtype).view(*shape)


class KVStoreServicer(pbg.KVStoreServicer):
    def __init__(self, core: KVStoreCore, lock: threading.Lock) -> None:
        self.core = core
        self.lock = lock

    def ReadBlocks(self, request: pb.ReadBlocksRequest, context) -> Iterator[pb.Block]:
        idx = list(request.block_indices)
        try:
            with self.lock:
                data = self.core.read(request.request_id, idx)
        except (KeyError, IndexError) as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        for i, block in zip(idx, data, strict=True):
            yield pb.Block(request_id=request.request_id, block_index=i,
                           data=to_bytes(block))

    def WriteBlocks(self, request_iterator, context) -> pb.WriteBlocksReply:
        spec = self.core.spec()
        n = 0
        for blk in request_iterator:
            data = from_bytes(blk.data, spec.torch_dtype, (1, *spec.block_shape))
            try:
                with self.lock:
                    self.core.write(blk.request_id, [blk.block_index], data)
            except (KeyError, IndexError, RuntimeError) as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            n += 1
        return pb.WriteBlocksReply(blocks_written=n)

    def Allocate(self, request: pb.AllocateRequest, context) -> pb.AllocateReply:
        with self.lock:
            got = self.core.allocate(request.request_id, request.num_blocks)
        return pb.AllocateReply(ok=got is not None, slots=got or [])

    def Free(self, request: pb.FreeRequest, context) -> pb.FreeReply:
        with self.lock:
            return pb.FreeReply(blocks_freed=self.core.free(request.request_id))

    def Stats(self, request: pb.StatsRequest, context) -> pb.StatsReply:
        with self.lock:
            st = self.core.stats()
        spec = self.core.spec()
        return pb.StatsReply(num_blocks=st.num_blocks, used_blocks=st.used_blocks,
                             num_requests=st.num_requests, block_shape=list(spec.block_shape),
                             dtype=spec.dtype, bytes_read=st.bytes_read,
                             bytes_written=st.bytes_written)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int


def start_server(core: KVStoreCore, lock: threading.Lock, host: str = "127.0.0.1",
                 port: int = 0, threads: int = 4) -> RunningServer:
    server = grpc.server(futures.ThreadPoolExecutor(threads), options=_OPTIONS)
    pbg.add_KVStoreServicer_to_server(KVStoreServicer(core, lock), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return RunningServer(server, bound)


class RemoteKVStoreClient:
    """A store on another node, over gRPC."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        self.stub = pbg.KVStoreStub(self.channel)
        st = self.stub.Stats(pb.StatsRequest(), timeout=_CONNECT_TIMEOUT_S)
        self.block_shape = tuple(st.block_shape)
        self.dtype = getattr(torch, st.dtype)

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        rep = self.stub.Allocate(pb.AllocateRequest(request_id=request_id,
                                                    num_blocks=num_blocks))
        return list(rep.slots) if rep.ok else None

    def free(self, request_id: str) -> int:
        return self.stub.Free(pb.FreeRequest(request_id=request_id)).blocks_freed

    def stats(self) -> pb.StatsReply:
        return self.stub.Stats(pb.StatsRequest())

    def stream(self, request_id: str, block_indices: list[int],
               timeout_s: float | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(block index, [*block_shape]) as each block arrives, so a caller copies one while
        the next is on the wire. Raises grpc.RpcError (NOT_FOUND: the request holds no such
        blocks; UNAVAILABLE / DEADLINE_EXCEEDED: the store or its node is gone)."""
        for b in self.stub.ReadBlocks(pb.ReadBlocksRequest(request_id=request_id,
                                                           block_indices=block_indices),
                                      timeout=timeout_s):
            yield b.block_index, from_bytes(b.data, self.dtype, self.block_shape)

    def read(self, request_id: str, block_indices: list[int]) -> torch.Tensor:
        """[k, *block_shape] in the order asked."""
        got = dict(self.stream(request_id, block_indices))
        return torch.stack([got[i] for i in block_indices])

    def write(self, request_id: str, block_indices: list[int], data: torch.Tensor) -> int:
        def blocks() -> Iterator[pb.Block]:
            for i, block in zip(block_indices, data, strict=True):
                yield pb.Block(request_id=request_id, block_index=i,
                               data=to_bytes(block.to(self.dtype)))

        return self.stub.WriteBlocks(blocks()).blocks_written

    def close(self) -> None:
        self.channel.close()


def pull_into(remote: RemoteKVStoreClient, request_id: str, num_blocks: int,
              dest: torch.Tensor, dest_slots: list[int], timeout_s: float) -> int:
    """Copy a request's first `num_blocks` blocks from a store on another node into
    `dest[dest_slots[i]]` (dest: [slots, *block_shape], e.g. this node's store arena), each
    block as it arrives. Returns the bytes moved; raises grpc.RpcError if the remote store
    fails or is gone, ValueError if it sent fewer blocks."""
    moved, n = 0, 0
    for i, block in remote.stream(request_id, list(range(num_blocks)), timeout_s):
        dest[dest_slots[i]].copy_(block)
        moved += block.numel() * block.element_size()
        n += 1
    if n != num_blocks:
        raise ValueError(f"{request_id!r}: the remote store sent {n} of {num_blocks} blocks")
    return moved
