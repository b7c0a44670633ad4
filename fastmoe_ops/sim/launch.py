"""Kernel launch on the CPU SIMT simulator with CuPy's calling convention.

Arguments, as `cupy.RawKernel.__call__` takes them:
  - torch CPU tensors and numpy arrays pass as pointers (their data address);
  - numpy scalars, numpy structured scalars, ctypes scalars and ctypes Structures pass by
    value (their raw bytes);
  - a Python int passes as a 64-bit integer, a float as a double, a bool as one byte (as
    CuPy does: cast explicitly to match the kernel's parameter);
  - None passes a null pointer.
Every by-value argument's size must equal the kernel parameter's size (refused before the
launch otherwise). Tensors and arrays also bound memcheck (FMO_SIM_MEMCHECK=1) to the bytes
their view spans (runtime/spans.py), not their whole storage; pointers hidden inside Params
structs need `extra_ranges=[(ptr, nbytes), ...]`.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

from .. import env
from ..errors import InputError, SimError
from ..runtime.spans import array_span, tensor_span

MAX_THREADS = 1024
MAX_SHARED = 227 * 1024  # the largest opt-in dynamic shared memory of a Hopper CTA


@dataclass(frozen=True)
class PackedArg:
    data: bytes
    span: tuple[int, int] | None  # memory the argument points to: (address, nbytes)
    pointer: bool


def _dims(value, what: str) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        dims = (int(value),)
    elif isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
        dims = tuple(int(v) for v in value)
    else:
        raise InputError(f"{what}: expected an int or a tuple of 1 to 3 ints, got {value!r}")
    if any(d <= 0 for d in dims):
        raise InputError(f"{what}: expected positive dimensions, got {value!r}")
    if what == "grid" and (dims[0] >= 2**31 or any(d > 65535 for d in dims[1:])):
        raise InputError(f"grid: expected x < 2^31 and y, z <= 65535, got {value!r}")
    return (dims + (1, 1, 1))[:3]  # type: ignore[return-value]


def pack_one(i: int, a) -> PackedArg:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise InputError(f"argument {i}: expected a CPU tensor for the simulator, got device {a.device}")
        return PackedArg(struct.pack("<Q", a.data_ptr()), tensor_span(a), True)
    if isinstance(a, np.ndarray):
        return PackedArg(struct.pack("<Q", a.ctypes.data), array_span(a), True)
    if a is None:
        return PackedArg(struct.pack("<Q", 0), None, True)
    if isinstance(a, (bool, np.bool_)):
        return PackedArg(bytes([1 if a else 0]), None, False)
    if isinstance(a, np.generic):  # numpy scalars, structured scalars (np.void)
        return PackedArg(a.tobytes(), None, False)
    if isinstance(a, int):
        return PackedArg(struct.pack("<q", a), None, False)
    if isinstance(a, float):
        return PackedArg(struct.pack("<d", a), None, False)
    if isinstance(a, (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)):
        return PackedArg(bytes(memoryview(a).cast("B")), None, False)
    raise InputError(f"argument {i}: expected a tensor, array, numpy/ctypes scalar or structure, int, float or bool; "
                     f"got {type(a).__name__}")


def pack_args(kernel: str, signature, args) -> tuple[bytes, list[tuple[int, int, int]]]:
    """Lay the arguments out as the kernel's parameter block (each aligned to its type)."""
    if not isinstance(args, (tuple, list)):
        raise InputError(f"{kernel}: args: expected a tuple of kernel arguments, got {type(args).__name__}")
    if len(args) != len(signature):
        raise InputError(f"{kernel}: expected {len(signature)} arguments, got {len(args)}")
    buf = bytearray()
    ranges = []
    for i, (a, (size, align)) in enumerate(zip(args, signature)):
        p = pack_one(i, a)
        if len(p.data) != size:
            kind = "a pointer (8 bytes)" if p.pointer else f"{len(p.data)} bytes ({type(a).__name__})"
            raise InputError(f"{kernel}: argument {i}: expected {size} bytes (the kernel parameter's size), "
                             f"got {kind}")
        buf.extend(b"\0" * (-len(buf) % align))
        buf.extend(p.data)
        if p.span is not None:
            ranges.append((p.span[0], p.span[0] + p.span[1], i))
    return bytes(buf), ranges


class Function:
    """A kernel of a simulated module: `f(grid, block, args, shared_mem=0)` as in CuPy."""

    def __init__(self, name: str, module, index: int, signature, owner=None, checking: bool = False):
        self.name = name
        self._module = module  # _simrt.Module
        self._index = index
        self.signature = tuple(tuple(s) for s in signature)  # ((size, align), ...)
        self._owner = owner  # the RawModule: rebuilds when FMO_SIM_RACECHECK/MEMCHECK change
        self._checking = checking

    @property
    def num_params(self) -> int:
        return len(self.signature)

    def __call__(self, grid, block, args, shared_mem=0, *, extra_ranges=(), sequential=None, stream=None,
                 enable_cooperative_groups=False):
        g = _dims(grid, "grid")
        b = _dims(block, "block")
        if b[0] * b[1] * b[2] > MAX_THREADS:
            raise InputError(f"{self.name}: block: expected at most {MAX_THREADS} threads, got {b}")
        shared_mem = int(shared_mem)
        if not 0 <= shared_mem <= MAX_SHARED:
            raise InputError(f"{self.name}: shared_mem: expected 0..{MAX_SHARED} bytes, got {shared_mem}")
        from .compile import checking_build

        if self._owner is not None and checking_build() != self._checking:
            # the checking flags changed since get_function: use the matching build
            f = self._owner.get_function(self.name)
            self._module, self._index, self._checking = f._module, f._index, f._checking
        data, ranges = pack_args(self.name, self.signature, args)
        for lo, n in extra_ranges:
            ranges.append((int(lo), int(lo) + int(n), -1))
        if sequential is None:
            sequential = env.flag("FMO_SIM_SEQUENTIAL")
        workers = 1 if sequential else (env.integer("FMO_SIM_WORKERS") if env.raw("FMO_SIM_WORKERS").strip() else 128)
        if workers < 1:
            raise InputError(f"FMO_SIM_WORKERS: expected a positive integer, got {workers}")
        error = self._module.launch(
            self._index, self.name, list(g), list(b), shared_mem, data, ranges, workers,
            env.number("FMO_SIM_TIMEOUT"), env.flag("FMO_SIM_MEMCHECK"), env.flag("FMO_SIM_RACECHECK"))
        if error:
            if self.name not in error:
                error = f"kernel {self.name}: {error}"
            raise SimError(error)
