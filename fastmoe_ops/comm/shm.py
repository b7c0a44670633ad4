"""Cross-process buffers over POSIX shared memory: the CPU stand-in for CUDA IPC handles.

Ranks on one machine (MPI processes) map the same POSIX shared-memory file (/dev/shm) and see
it as a torch CPU tensor, so a kernel in one process (the simulator's, for the ipc transport)
can spin (with atomics or `fmo_sim::yield()`) on a flag that a kernel in another process
writes. Plain host code, no simulator: the communication layer owns it.

    handle, buf = shm.create(nbytes)       # rank 0; send `handle` (picklable) to the peers
    peer = shm.open(handle)                # other ranks: a uint8 tensor over the same bytes
    ...
    shm.close(peer); shm.close(buf)        # the creator's close also unlinks the name
"""
from __future__ import annotations

import mmap
import os
import threading
import uuid
from dataclasses import dataclass

import torch

from ..errors import InputError

_SHM_DIR = "/dev/shm"
_lock = threading.Lock()
_maps: dict[int, tuple["Handle", mmap.mmap, bool]] = {}  # tensor data_ptr -> (handle, map, owner)


@dataclass(frozen=True)
class Handle:
    """Names a shared buffer; send it to peer processes (it pickles)."""

    name: str
    nbytes: int

    @property
    def path(self) -> str:
        return os.path.join(_SHM_DIR, self.name)


def _map(handle: Handle, owner: bool) -> torch.Tensor:
    fd = os.open(handle.path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, handle.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    t = torch.frombuffer(mm, dtype=torch.uint8)
    with _lock:
        _maps[t.data_ptr()] = (handle, mm, owner)
    return t


def create(nbytes: int, name: str | None = None) -> tuple[Handle, torch.Tensor]:
    """A new zero-filled shared buffer of `nbytes` bytes, as a uint8 tensor, and its handle.
    name: the buffer's name (peers that can work it out need no handle); default a unique one."""
    if int(nbytes) <= 0:
        raise InputError(f"nbytes: expected a positive size, got {nbytes}")
    handle = Handle(name or f"fmo_sim_{os.getpid()}_{uuid.uuid4().hex}", int(nbytes))
    fd = os.open(handle.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, handle.nbytes)
    finally:
        os.close(fd)
    return handle, _map(handle, owner=True)


def open(handle: Handle) -> torch.Tensor:  # noqa: A001 - mirrors cudaIpcOpenMemHandle
    """Map a peer's buffer into this process (a uint8 tensor over the same bytes)."""
    if not os.path.exists(handle.path):
        raise InputError(f"handle: expected an existing shared buffer, got {handle.name!r} (closed by its creator?)")
    return _map(handle, owner=False)


def open_named(name: str) -> torch.Tensor:
    """Map a buffer a peer created under a name both sides can work out (its whole size)."""
    path = Handle(name, 0).path
    if not os.path.exists(path):
        raise InputError(f"name: expected an existing shared buffer, got {name!r} (closed by its creator?)")
    return _map(Handle(name, os.path.getsize(path)), owner=False)


def unlink(handle: Handle) -> None:
    """Remove the buffer's name once every process has mapped it: the mappings stay valid,
    and nothing is left in /dev/shm if a process dies before close()."""
    try:
        os.unlink(handle.path)
    except FileNotFoundError:
        pass


def close(tensor: torch.Tensor) -> None:
    """Forget a mapping made by create/open; the creator's close also unlinks the name.

    The bytes stay mapped while any tensor (or view) still refers to them."""
    with _lock:
        entry = _maps.pop(tensor.data_ptr(), None)
    if entry is None:
        raise InputError("tensor: expected a buffer from shm.create or shm.open, got another tensor")
    handle, _mm, owner = entry
    if owner:
        unlink(handle)
