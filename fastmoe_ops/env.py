"""The FMO_* environment namespace: every variable is declared and read here, nowhere else.

Values are read at call time (not import time) so a test or a launcher script can change
them in-process. `CODEGEN_VARIABLES` lists those that change generated code; the kernel
cache key includes their values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    doc: str
    changes_codegen: bool = False


VARIABLES: tuple[Variable, ...] = (
    Variable("FMO_BACKEND", "", "Engine for CPU tensors: `sim` (kernel source on the CPU SIMT simulator) or `reference` (plain PyTorch). Default: `reference`; tests and kernel developers set `sim` (the test suite does). CUDA tensors always use `cuda`."),
    Variable("FMO_CACHE_DIR", "~/.cache/fastmoe_ops", "Disk cache of compiled kernels (cubins and host modules)."),
    Variable("FMO_DEBUG_DUMP", "", "Directory: write each compiled kernel's stub, PTX and SASS there."),
    Variable("FMO_PTXAS_VERBOSE", "0", "1: print ptxas' register/spill report for every compile (nvcc always records it beside the cubin)."),
    Variable("FMO_NVCC", "", "Path to nvcc for offline builds (default: `$CUDA_HOME/bin/nvcc`, then PATH)."),
    Variable("FMO_COMPILER", "auto", "Run-time compiler of the `cuda` engine: `auto` (NVRTC, then nvcc if NVRTC fails), `nvrtc`, or `nvcc` (the very cubins `python -m fastmoe_ops.build` reports on and caches; the one-shot GPU check uses it so the tests start from the build step's cache)."),
    Variable("FMO_FAST_LAUNCH", "1", "0: every call of a public op takes the Python path; default: a warm call (same signature as an earlier one) is replayed by a small C++ extension (csrc/launcher/fast_launch.cpp, built into FMO_CACHE_DIR on the first call; the Python path serves, with a warning, where it cannot be built)."),
    Variable("FMO_SYNC_CHECK", "0", "1: synchronise after every CUDA launch so an asynchronous fault is raised naming its kernel (slow; debugging)."),
    Variable("FMO_COMM_SMS", "20", "SMs reserved for communication kernels (the default SM budget)."),
    Variable("FMO_COMM_TIMEOUT", "60", "Seconds a rank waits for a peer before raising CommTimeoutError."),
    Variable("FMO_MPI_CUDA_AWARE", "auto", "The `mpi` transport and CUDA tensors: `1` hands device buffers to MPI (the library must be CUDA-aware), `0` stages rows through pinned host memory, `auto` asks the library (`MPIX_Query_cuda_support` through mpi4py; staging where it cannot say). Decided when a Buffer is built; staging on every rank unless all ranks choose device buffers."),
    Variable("FMO_SIM_RACECHECK", "0", "1: simulator checks shared-memory races (instrumented build of the kernel).", True),
    Variable("FMO_SIM_MEMCHECK", "0", "1: simulator checks every global access against the launch's tensors (instrumented build).", True),
    Variable("FMO_SIM_SEQUENTIAL", "0", "1: simulator runs one CTA at a time, in order (deterministic debugging)."),
    Variable("FMO_SIM_WORKERS", "", "Simulator: most CTAs resident at once (OS worker threads). Default: the whole grid, up to 128."),
    Variable("FMO_SIM_TIMEOUT", "120", "Simulator: seconds a launch may run before it is stopped as hung."),
    Variable("FMO_SIM_CXX", "", "Host C++ compiler for simulator modules (default: $CXX, then g++)."),
    Variable("FMO_TRACE", "0", "1: every kernel records its start and end per CTA (%globaltimer) into a trace buffer; `fastmoe_ops.trace` turns it into per-stream intervals (overlap proof).", True),
    Variable("FMO_TRACE_CAPACITY", "131072", "Events the trace buffer of each device holds (two per CTA, 24 bytes each); overflowing it is an error at `trace.collect()`."),
)

_BY_NAME = {v.name: v for v in VARIABLES}
CODEGEN_VARIABLES = tuple(v.name for v in VARIABLES if v.changes_codegen)

# Several variables are read on every kernel launch. os.environ.get encodes the key and
# decodes the value (~0.5 us each); CPython's POSIX os.environ keeps its contents in the dict
# `_data` (bytes -> bytes) that every os.environ update writes through, so reading that dict
# returns the same value for a twentieth of the cost. Anything else (another platform, a
# replaced os.environ) takes os.environ.get.
_ENVIRON_CLASS = type(os.environ)
_FAST = os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict)
_ENCODED = {v.name: (os.fsencode(v.name), v.default) for v in VARIABLES}


def raw(name: str) -> str:
    """The variable's value, or its default. Unknown names are a programming error."""
    environ = os.environ
    if _FAST and environ.__class__ is _ENVIRON_CLASS:
        key, default = _ENCODED[name]
        value = environ._data.get(key)
        return default if value is None else os.fsdecode(value)
    return environ.get(name, _BY_NAME[name].default)


_TRUE = ("1", "true", "yes", "on")
_flag_values: dict[str, bool] = {}  # raw value -> parsed; the few spellings ever set


def flag(name: str) -> bool:
    value = raw(name)
    parsed = _flag_values.get(value)
    if parsed is None:
        parsed = value.strip().lower() in _TRUE
        if len(_flag_values) < 256:
            _flag_values[value] = parsed
    return parsed


def integer(name: str) -> int:
    value = raw(name).strip()
    try:
        return int(value)
    except ValueError:
        from .errors import InputError

        raise InputError(f"{name}: expected an integer, got {value!r}") from None


def number(name: str) -> float:
    value = raw(name).strip()
    try:
        return float(value)
    except ValueError:
        from .errors import InputError

        raise InputError(f"{name}: expected a number, got {value!r}") from None


def path(name: str) -> Path | None:
    value = raw(name).strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    return path("FMO_CACHE_DIR")  # type: ignore[return-value]


def codegen_snapshot() -> dict[str, str]:
    """Values of every codegen-changing variable: part of each kernel's cache key."""
    return {name: raw(name) for name in CODEGEN_VARIABLES}


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for v in VARIABLES:
        rows.append(f"| `{v.name}` | `{v.default}` | {v.doc} |")
    return "\n".join(rows)
