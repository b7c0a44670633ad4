"""CPU SIMT simulator: run the kernels' own CUDA C++ on the CPU with CUDA's execution model.

A stand-in for `cupy.RawModule`:

    from fastmoe_ops.sim import RawModule
    mod = RawModule(code=src, options=("-DTILE=32",), name_expressions=("k<float, 128>",))
    f = mod.get_function("k<float, 128>")
    f((grid_x, grid_y), (128,), (x, y, np.int32(n)), shared_mem=0)

Each CUDA thread is a fiber; a CTA's threads run cooperatively on one OS thread; CTAs run
concurrently on a pool of OS threads. See csrc/sim/runtime.h for the model and
csrc/sim/device_api.h for the device API that PTX emulation builds on.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

from .. import env
from ..errors import BackendError, CompileError, SimError
from . import compile as _compile
from .launch import Function

__all__ = ["RawModule", "Function", "available", "switch_ns"]

_loaded: dict[str, object] = {}
_loaded_lock = threading.Lock()


def _runtime():
    try:
        from . import _simrt
    except ImportError as e:
        raise BackendError(f"the simulator extension is not built ({e}); run `pip install -e .`") from None
    return _simrt


def available() -> bool:
    """The runtime extension imports and a host C++ compiler exists."""
    try:
        _runtime()
        _compile.compiler()
        _compile.cuda_include()
        return True
    except Exception:
        return False


def switch_ns(n: int = 1_000_000) -> float:
    """Measured cost of one fiber context switch, in nanoseconds."""
    return _runtime().switch_ns(n)


def _load(path) -> object:
    key = str(path)
    with _loaded_lock:
        mod = _loaded.get(key)
        if mod is None:
            try:
                mod = _runtime().Module(key)
            except RuntimeError as e:
                raise CompileError(f"simulator could not load {key}: {e}") from None
            _loaded[key] = mod
        return mod


class RawModule:
    """CUDA C++ source compiled for the simulator; kernels are compiled lazily by name."""

    def __init__(self, code: str | None = None, *, path: str | None = None, options=(), backend=None,
                 translate_cucomplex=False, enable_cooperative_groups=False, name_expressions=None, jitify=False):
        if code is None:
            if path is None:
                raise ValueError("RawModule: give code or path")
            with open(path) as f:
                code = f.read()
        self.code = code
        self.options = tuple(options or ())
        self._names: list[str] = list(name_expressions or ())
        self._lock = threading.Lock()

    def _module_for(self, names: tuple[str, ...]):
        return _load(_compile.build_module(self.code, self.options, names))

    def get_function(self, name: str) -> Function:
        with self._lock:
            if name not in self._names:
                self._names.append(name)
            names = tuple(self._names)
        mod = self._module_for(names)
        index = names.index(name)
        return Function(name, mod, index, mod.signature(index), owner=self, checking=_compile.checking_build())

    def get_global(self, name: str) -> np.ndarray:
        """A writable uint8 view of a `__device__`/`__constant__` variable (use `.view(dtype)`)."""
        with self._lock:
            names = tuple(self._names)
        addr, size = self._module_for(names).symbol(name)
        if not addr:
            raise SimError(f"get_global: no variable named {name!r} in the module")
        return np.frombuffer((ctypes.c_ubyte * size).from_address(addr), dtype=np.uint8)

    def compile(self, log_stream=None) -> None:
        with self._lock:
            names = tuple(self._names)
        self._module_for(names)
