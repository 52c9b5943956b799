"""A named shared-memory segment viewed as a tensor of KV blocks, plus a small int64 header.

Layout of the segment: [header: header_slots x int64][blocks: num_blocks x block_shape].
The creator zero-fills it once (every page is touched at start-up, not mid-step) and owns
its lifetime (`unlink`); other processes on the node `attach` by name and read and write the
same bytes, with no serialization. The header carries counters one process writes and
another polls, such as the last finished KV transfer (`prefetch_workers/worker.py`).

Python's resource tracker would unlink a segment when any process that merely attached to
it exits; attaching processes unregister it, so only the creator decides. The header's last
slot holds the creator's pid, so a segment whose creator died without unlinking it (kill
-9) is found and removed by the next process that starts one (`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import psutil
import torch

_HEADER_ITEM = 8  # bytes per header slot (int64)
_SHM_DIR = Path("/dev/shm")  # where Linux keeps POSIX shared memory
PREFIX = "as-"  # every arena this project creates is named as-...
_OWNER_SLOT = 7  # header slot holding the creator's pid (headers have at least 8 slots)
log = logging.getLogger("alignedserve.kv_store")


@dataclass(frozen=True)
class ArenaSpec:
    """Everything another process needs to attach (picklable, sent over Ray)."""

    name: str  # shared-memory segment name (/dev/shm/<name> on Linux)
    num_blocks: int
    block_shape: tuple[int, ...]  # one block, e.g. [layers, K|V, block_size, kv_heads, dim]
    dtype: str  # torch dtype name without the prefix, e.g. "float32"
    header_slots: int = 8

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def block_bytes(self) -> int:
        elem = torch.tensor([], dtype=self.torch_dtype).element_size()
        return int(np.prod(self.block_shape)) * elem

    @property
    def nbytes(self) -> int:
        return self.header_slots * _HEADER_ITEM + self.num_blocks * self.block_bytes


class ShmArena:
    def __init__(self, shm: shared_memory.SharedMemory, spec: ArenaSpec, owner: bool) -> None:
        self._shm: shared_memory.SharedMemory | None = shm
        self.spec = spec
        self.owner = owner
        head = spec.header_slots * _HEADER_ITEM
        buf = shm.buf
        # header: [header_slots] int64; blocks: [num_blocks, *block_shape]
        self.header = torch.frombuffer(buf, dtype=torch.int64, count=spec.header_slots)
        self.blocks = torch.frombuffer(
            buf, dtype=spec.torch_dtype, offset=head,
            count=spec.num_blocks * int(np.prod(spec.block_shape)),
        ).view(spec.num_blocks, *spec.block_shape)

    @classmethod
    def create(cls, name: str, num_blocks: int, block_shape: tuple[int, ...],
               dtype: torch.dtype, header_slots: int = 8) -> ShmArena:
        if header_slots <= _OWNER_SLOT:
            raise ValueError(f"an arena header needs at least {_OWNER_SLOT + 1} slots")
        spec = ArenaSpec(name, num_blocks, tuple(block_shape), str(dtype).removeprefix("torch."),
                         header_slots)
        shm = shared_memory.SharedMemory(name=name, create=True, size=spec.nbytes)
        arena = cls(shm, spec, owner=True)
        arena.header.zero_()
        arena.header[_OWNER_SLOT] = os.getpid()  # the owner, for remove_orphans
        arena.blocks.zero_()  # touch every page now
        return arena

    @classmethod
    def attach(cls, spec: ArenaSpec) -> ShmArena:
        shm = shared_memory.SharedMemory(name=spec.name, create=False)
        # The creator owns it. The tracker registered the POSIX name, "/" + name.
        resource_tracker.unregister("/" + spec.name, "shared_memory")
        return cls(shm, spec, owner=False)

    def close(self) -> None:
        """Unmap. Tensors viewing the segment must not be used afterwards."""
        if self._shm is None:
            return
        del self.header, self.blocks  # drop the views before the buffer goes
        with contextlib.suppress(BufferError):  # a view still alive: unmapped at process exit
            self._shm.close()
        self._shm = None

    def unlink(self) -> None:
        """Remove the segment (creator only); attached processes keep their mappings."""
        name = self.spec.name
        try:
            seg = shared_memory.SharedMemory(name=name, create=False)
        except FileNotFoundError:
            return
        seg.close()
        seg.unlink()


def arena_owners(prefix: str = PREFIX) -> dict[str, int]:
    """This project's segments in /dev/shm and the pid of the process that created each
    (0 while one is being created)."""
    owners = {}
    for path in sorted(_SHM_DIR.glob(f"{prefix}*")):
        try:
            with path.open("rb") as f:
                head = f.read(_HEADER_ITEM * (_OWNER_SLOT + 1))
        except OSError:
            continue  # removed meanwhile
        if len(head) == _HEADER_ITEM * (_OWNER_SLOT + 1):
            owners[path.name] = int(np.frombuffer(head, dtype=np.int64)[_OWNER_SLOT])
    return owners


def remove_orphans(prefix: str = PREFIX) -> list[str]:
    """Unlink this project's segments whose creating process is gone; returns their names.
    A segment being created right now (pid not written yet) is left alone."""
    removed = []
    for name, pid in arena_owners(prefix).items():
        if pid <= 0 or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another starter got there first
            (_SHM_DIR / name).unlink()
            removed.append(name)
    if removed:
        log.warning("removed shared-memory arenas of dead processes: %s", ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    """A zombie is dead: it will never unlink what it made (one whose parent was killed
    can stay unreaped for good where PID 1 does not reap, as in many containers)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: alive
