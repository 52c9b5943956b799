from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Block(_message.Message):
    __slots__ = ("request_id", "block_index", "data")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_index: int
    data: bytes
    def __init__(self, request_id: _Optional[str] = ..., block_index: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReadBlocksRequest(_message.Message):
    __slots__ = ("request_id", "block_indices")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., block_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class WriteBlocksReply(_message.Message):
    __slots__ = ("blocks_written",)
    BLOCKS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    blocks_written: int
    def __init__(self, blocks_written: _Optional[int] = ...) -> None: ...

class AllocateRequest(_message.Message):
    __slots__ = ("request_id", "num_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_blocks: int
    def __init__(self, request_id: _Optional[str] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class AllocateReply(_message.Message):
    __slots__ = ("ok", "slots")
    OK_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ok: _Optional[bool] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...

class FreeRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class FreeReply(_message.Message):
    __slots__ = ("blocks_freed",)
    BLOCKS_FREED_FIELD_NUMBER: _ClassVar[int]
    blocks_freed: int
    def __init__(self, blocks_freed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("num_blocks", "used_blocks", "num_requests", "block_shape", "dtype", "bytes_read", "bytes_written")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    used_blocks: int
    num_requests: int
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    bytes_read: int
    bytes_written: int
    def __init__(self, num_blocks: _Optional[int] = ..., used_blocks: _Optional[int] = ..., num_requests: _Optional[int] = ..., block_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ...) -> None: ...
