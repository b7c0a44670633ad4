"""Launch a compiled kernel variant on the `cuda` or `sim` engine, from one description.

Both engines receive the same Params bytes, grid, block and shared-memory size, so only
the engine differs. A warm launch is one dictionary lookup (spec -> loaded function) plus
the launch itself; compilation and module loading happen once per (spec, device).
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import env
from ..errors import BackendError, InputError, LaunchError
from . import cuda_driver
from .fast_launch import _recording as _fast_recording, note_launch
from .compiler import compile_nvcc, compile_nvrtc, include_options
from .sources import on_refresh
from .spans import tensor_span
from .spec import KernelSpec, Params

MAX_BLOCK_THREADS = 1024
MAX_DYNAMIC_SMEM = 227 * 1024  # Hopper's per-CTA opt-in maximum


def _dim3(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and d >= 1 for d in dims):
        raise InputError(f"{what}: expected 1 to 3 positive ints, got {value!r}")
    return tuple(dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


@dataclass(slots=True)  # not frozen: frozen dataclasses cost microseconds per construction
class LaunchConfig:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int = 0

    @staticmethod
    def make(grid, block, shared_mem: int = 0) -> "LaunchConfig":
        if grid.__class__ is int and block.__class__ is int and 1 <= grid < 2**31 and 1 <= block <= MAX_BLOCK_THREADS \
                and shared_mem.__class__ is int and 0 <= shared_mem <= MAX_DYNAMIC_SMEM:
            return LaunchConfig((grid, 1, 1), (block, 1, 1), shared_mem)  # the common 1-D case
        g = _dim3(grid, "grid")
        b = _dim3(block, "block")
        threads = b[0] * b[1] * b[2]
        if threads > MAX_BLOCK_THREADS:
            raise InputError(f"block: expected at most {MAX_BLOCK_THREADS} threads, got {threads}")
        if g[1] > 65535 or g[2] > 65535 or g[0] > 2**31 - 1:
            raise InputError(f"grid: expected x < 2^31 and y, z <= 65535, got {g}")
        if not 0 <= shared_mem <= MAX_DYNAMIC_SMEM:
            raise InputError(f"shared_mem: expected 0..{MAX_DYNAMIC_SMEM} bytes, got {shared_mem}")
        return LaunchConfig(g, b, int(shared_mem))


# ---------------------------------------------------------------------------- cuda engine


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    # Hopper's architecture-specific features (wgmma, TMA multicast, setmaxnreg) need `a`.
    return f"sm_{major}{minor}{'a' if major == 9 else ''}"


class _CudaFunction:
    __slots__ = ("name", "kernel", "traced")

    def __init__(self, name: str, cubin_path, traced: bool = False):
        self.name = name
        self.traced = traced  # compiled with the trace parameter (FMO_TRACE=1)
        self.kernel = cuda_driver.Module(Path(cubin_path).read_bytes(), name).kernel(name)

    def launch(self, config: LaunchConfig, params: Params, stream: int, trace_args: Params | None = None) -> None:
        if trace_args is None:
            arg_ptrs = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        else:
            arg_ptrs = (ctypes.c_void_p * 2)(ctypes.addressof(params), ctypes.addressof(trace_args))
        self.kernel.launch(config.grid, config.block, config.shared_mem, stream, ctypes.addressof(arg_ptrs))


_cuda_functions: dict[tuple, _CudaFunction] = {}
on_refresh(_cuda_functions.clear)  # sources.refresh(): the next launch loads the edited kernel
_lock = threading.Lock()


def _compile_for_device(stub: str, name: str, arch: str):
    choice = env.raw("FMO_COMPILER").strip() or "auto"
    if choice == "nvcc":
        return compile_nvcc(stub, name, arch)
    if choice == "nvrtc":
        return compile_nvrtc(stub, name, arch)
    if choice != "auto":
        raise InputError(f"FMO_COMPILER: expected 'auto', 'nvrtc' or 'nvcc', got {choice!r}")
    try:
        return compile_nvrtc(stub, name, arch)
    except Exception:
        if env.path("FMO_NVCC") is None:
            raise
        return compile_nvcc(stub, name, arch)


def cuda_function(spec: KernelSpec, device: torch.device) -> _CudaFunction:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (spec, index, *map(env.raw, env.CODEGEN_VARIABLES))
    fn = _cuda_functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _cuda_functions.get(key)
        if fn is None:
            arch = device_arch(torch.device("cuda", index))
            name = spec.entry_name()
            traced = spec.traced()
            stub = spec.stub(traced)
            result = _compile_for_device(stub, name, arch)
            with torch.cuda.device(index):
                fn = _CudaFunction(name, result.cubin, traced)
            _cuda_functions[key] = fn
    return fn


# ----------------------------------------------------------------------------- sim engine

_sim_functions: dict[tuple[KernelSpec, bool], object] = {}
on_refresh(_sim_functions.clear)


def sim_function(spec: KernelSpec, traced: bool = False):
    # Keyed by (spec, traced): tracing changes the stub. A sim Function itself switches to
    # the instrumented build when FMO_SIM_RACECHECK/MEMCHECK change after it was made.
    key = (spec, traced)
    fn = _sim_functions.get(key)
    if fn is not None:
        return fn
    try:
        from .. import sim
    except ImportError as e:
        raise BackendError(f"{spec.entry_name()}: simulator not available: {e}") from None
    if not sim.available():
        raise BackendError(f"{spec.entry_name()}: simulator not built here (pip install -e . builds it)")
    with _lock:
        fn = _sim_functions.get(key)
        if fn is None:
            module = sim.RawModule(code=spec.stub(traced), options=tuple(include_options()))
            fn = module.get_function(spec.entry_name())
            _sim_functions[key] = fn
    return fn


# ------------------------------------------------------------------------------- launch


@dataclass(slots=True)
class Plan:
    """Everything one launch needs, prepared on the host: what an op's `plan_*` returns.

    Separating preparation (validation, heuristics, Params) from the launch lets benchmarks
    measure the host overhead of a warm call on any machine."""

    spec: KernelSpec
    config: LaunchConfig
    params: Params
    tensors: tuple[torch.Tensor, ...]

    def run(self, engine: str) -> None:
        launch(self.spec, self.config, self.params, engine=engine, tensors=self.tensors)


def lookup(spec: KernelSpec, engine: str, device: torch.device):
    """The loaded function a launch of `spec` on `engine` uses (what `launch` looks up):
    one dictionary hit when warm. Benchmarks time it as part of a call's host overhead."""
    if engine == "cuda":
        return cuda_function(spec, device)
    if engine == "sim":
        return sim_function(spec, spec.traced())
    raise InputError(f"engine: expected 'cuda' or 'sim' for a kernel launch, got {engine!r}")


def launch(spec: KernelSpec, config: LaunchConfig, params: Params, *, engine: str, tensors: tuple[torch.Tensor, ...]) -> None:
    """Run `spec` with `params` on `engine` ('cuda' or 'sim').

    `tensors` are every tensor the Params point into: the simulator's memory checker
    allows accesses inside them and nothing else; on CUDA they fix the device."""
    if getattr(_fast_recording, "launches", None) is not None:  # a miss being recorded for the fast path
        note_launch(spec, config, params, engine, tensors)
    if engine == "cuda":
        device = tensors[0].device
        fn = cuda_function(spec, device)
        stream = torch.cuda.current_stream(device).cuda_stream
        if fn.traced:
            from .. import trace

            fn.launch(config, params, stream, trace.kernel_args(fn.name, "cuda", device).args)
        else:
            fn.launch(config, params, stream)
        if env.flag("FMO_SYNC_CHECK"):
            try:
                torch.cuda.synchronize(device)
            except Exception as e:
                raise LaunchError(f"{fn.name}: kernel failed: {e}") from None
    elif engine == "sim":
        ranges = tuple(map(tensor_span, tensors))  # each view's bytes, not its whole storage
        fn = sim_function(spec, spec.traced())  # lookup(spec, "sim", None) without its engine dispatch
        if fn.num_params == 1:  # untraced build
            fn(config.grid, config.block, (params,), shared_mem=config.shared_mem, extra_ranges=ranges)
            return
        from .. import trace

        targs = trace.kernel_args(fn.name, "sim", torch.device("cpu"))
        with targs.in_flight():  # collect() waits for launches still writing their records
            fn(config.grid, config.block, (params, targs.args), shared_mem=config.shared_mem,
               extra_ranges=ranges + targs.ranges)
    else:
        raise InputError(f"engine: expected 'cuda' or 'sim' for a kernel launch, got {engine!r}")
