"""Engine selection: `cuda` for CUDA tensors; `sim` or `reference` for CPU tensors.

The engine follows the tensors' device. For CPU tensors the choice is, in order: the
innermost `use_backend(...)` context, then FMO_BACKEND, then `reference`: a model run on
the CPU gets plain PyTorch. The simulator (`sim`: the kernels' own source on the CPU) is a
verification tool that tests and kernel developers ask for by name; it is 10-100x slower.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from . import env
from .errors import BackendError, InputError
from .runtime import cuda_driver

ENGINES = ("cuda", "sim", "reference")
CPU_ENGINES = ("sim", "reference")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fmo_backend", default=None)


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return cuda_driver.cupy_version() is not None


@functools.lru_cache(maxsize=None)
def _sim_available() -> bool:
    """Whether the simulator can run here; fixed for the life of the process (cached: the
    check looks for a host compiler and must not sit on every launch's path)."""
    try:
        from . import sim
    except ImportError:
        return False
    available = getattr(sim, "available", None)
    return bool(available and available())


def available_backends() -> list[str]:
    """The engines this machine can run, in preference order."""
    out = []
    if _cuda_available():
        out.append("cuda")
    if _sim_available():
        out.append("sim")
    out.append("reference")
    return out


def _check_name(name: str, where: str) -> str:
    if name not in CPU_ENGINES:
        raise InputError(f"{where}: expected one of {CPU_ENGINES} (the engines for CPU tensors), got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run CPU tensors through engine `name` ('sim' or 'reference') inside the block."""
    _check_name(name, "use_backend(name)")
    if name == "sim" and not _sim_available():
        raise BackendError("use_backend('sim'): the simulator extension is not built here (pip install -e . builds it)")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def cpu_engine() -> str:
    name = _override.get()
    if name is not None:
        return name
    requested = env.raw("FMO_BACKEND").strip()
    if requested:
        _check_name(requested, "FMO_BACKEND")
        if requested == "sim" and not _sim_available():
            raise BackendError("FMO_BACKEND=sim: the simulator extension is not built here (pip install -e . builds it)")
        return requested
    return "reference"


def engine_for(**tensors: torch.Tensor) -> str:
    """The engine for an op whose tensor arguments are `tensors` (name -> tensor).

    All must live on one device; CUDA tensors need CuPy."""
    if len(tensors) == 1:  # the common case, without the bookkeeping below
        (name, t), = tensors.items()
        if isinstance(t, torch.Tensor):
            if t.is_cpu:  # is_cpu / is_cuda: no torch.device object made (~0.3 us)
                return cpu_engine()
            if t.is_cuda and _cuda_available():
                return "cuda"
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not devices:
        raise InputError("engine_for: expected at least one tensor argument")
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise InputError(f"{name}: expected a tensor on {first} (like {first_name}), got one on {dev}")
    if first.type == "cuda":
        if not _cuda_available():
            raise BackendError(f"{first_name}: CUDA tensor given but CuPy is not installed (pip install 'fastmoe-ops[cuda]')")
        return "cuda"
    if first.type != "cpu":
        raise InputError(f"{first_name}: expected a CPU or CUDA tensor, got device {first}")
    return cpu_engine()
