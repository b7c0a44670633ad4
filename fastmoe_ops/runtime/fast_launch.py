"""The fast launch path: a warm call of a public op replayed in C++ (csrc/launcher/fast_launch.cpp).

A routed op asks its `Table` first and runs its own Python path on a miss:

    hit = _FAST.call(x, group_size, pow2_scale, eps)   # every argument, positionally
    if hit is not None:
        return hit
    return _FAST.record(_python_path, x, group_size, pow2_scale, eps)

`record` runs the Python path (validation, heuristics, Params: the single source of truth,
so a bad input raises exactly as before) while runtime/launch.py reports each launch to it,
then files what the call did under the call's signature in the C++ table: the outputs it
allocated and each launch's Params with the pointer fields to patch. What the signature
covers is listed at the top of the C++ file. A call is filed only when all of it can be
replayed: every launch on `cuda` or `sim`, untraced, no FMO_SYNC_CHECK; every Params field
a plain scalar, every nonzero pointer field naming exactly one argument or output; every
output a fresh contiguous allocation that the call returns. Anything else stays on the
Python path, as does every call while the extension cannot be built or loaded (warned
once, naming why) or `FMO_FAST_LAUNCH=0`.

The extension is built on the first routed call, not at import, with
torch.utils.cpp_extension into FMO_CACHE_DIR/fast_launch/<torch version>-<source hash>
(torch's file lock there serialises ranks building at once); later processes load the built
module directly.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import threading
import warnings
from pathlib import Path

import torch

from .. import env
from .sources import on_refresh

_SOURCE = Path(__file__).resolve().parent.parent / "_kernels" / "csrc" / "launcher" / "fast_launch.cpp"
_lock = threading.Lock()
_state: dict = {}          # "module" -> the loaded extension, or "error" -> why not
_tables: list["Table"] = []
_recording = threading.local()  # .launches: the list a `record` in progress collects into
on_refresh(lambda: clear_all())  # sources.refresh(): plans hold loaded kernels of the old sources


def enabled() -> bool:
    return env.raw("FMO_FAST_LAUNCH").strip().lower() not in ("0", "false", "no", "off")


def build_directory() -> Path:
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + torch.__version__.encode() + str(torch.version.cuda).encode()).hexdigest()[:16]
    return env.cache_dir() / "fast_launch" / f"torch{torch.__version__.replace('+', '_')}-{tag}"


def _load():
    """The extension module: loaded when built before, else built here (tens of seconds)."""
    directory = build_directory()
    name = "fmo_fast_launch_" + directory.name.rsplit("-", 1)[1]
    built = directory / f"{name}.so"
    if built.exists():
        spec = importlib.util.spec_from_file_location(name, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    cuda = torch.version.cuda is not None
    return cpp_extension.load(name=name, sources=[str(_SOURCE)], build_directory=str(directory),
                              extra_cflags=["-O2"] + (["-DFMO_WITH_CUDA"] if cuda else []),
                              with_cuda=cuda, verbose=False)


def module():
    """The configured extension, or None (disabled, or it failed: warned once)."""
    m = _state.get("module")
    if m is not None or "error" in _state:
        return m
    with _lock:
        if "module" in _state or "error" in _state:
            return _state.get("module")
        try:
            m = _load()
            from .. import backends, budget
            from ..errors import LaunchError

            m.configure(_run_sim, LaunchError, backends._override, vars(budget))
        except Exception as e:  # no compiler, ABI mismatch, a read-only cache: the Python path serves
            _state["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"fastmoe_ops fast launch path unavailable, every call takes the Python path "
                          f"({_state['error'][:500]})", RuntimeWarning, stacklevel=3)
            return None
        _state["module"] = m
        return m


def _run_sim(target, params: bytes, tensors: tuple) -> None:
    """The simulator launch of a hit: the Python path's own launch (its memory checker,
    tracing and worker settings; the benchmark's kernel skip) from the patched Params."""
    spec, config, params_class = target
    from .launch import launch

    launch(spec, config, params_class.from_buffer_copy(params), engine="sim", tensors=tensors)


class Table:
    """One op's plans. `call(*args)`: the outputs on a hit, else None. `record(fn, *args)`:
    fn(*args), filed for the next call with the same signature when it can be replayed."""

    __slots__ = ("name", "zeroed", "call", "_table")

    def __init__(self, name: str, zeroed: tuple[int, ...] = ()):
        self.name = name
        self.zeroed = zeroed  # outputs the Python path allocates zero-filled (torch.zeros)
        self._table = None
        self.call = self._first_call  # becomes the C++ table's own __call__ once loaded

    def _first_call(self, *args):
        if not enabled():
            return None
        m = module()
        if m is None:
            return None
        if self._table is None:
            self._table = m.Table(self.name)
        self.call = self._table.bound_call()
        return self.call(*args)

    def record(self, fn, *args):
        if self._table is None or not enabled():
            return fn(*args)
        previous = getattr(_recording, "launches", None)
        launches = _recording.launches = []
        m = _state["module"]
        m.recording(1)  # nested routed ops miss meanwhile: their launches must reach this record
        try:
            result = fn(*args)
        finally:
            m.recording(-1)
            _recording.launches = previous
        if previous is None:  # a nested op's launches belong to its caller's recording too
            _file(self, args, launches, result)
        else:
            previous.extend(launches)
        return result

    def clear(self) -> None:
        if self._table is not None:
            self._table.clear()

    def __len__(self) -> int:
        return 0 if self._table is None else len(self._table)

    def counts(self) -> tuple[int, int]:
        """(hits, misses) of the C++ table so far."""
        return (0, 0) if self._table is None else self._table.counts()


def table(name: str, zeroed: tuple[int, ...] = ()) -> Table:
    t = Table(name, zeroed)
    _tables.append(t)
    return t


def clear_all() -> None:
    for t in _tables:
        t.clear()


def note_launch(spec, config, params, engine: str, tensors) -> None:
    """runtime/launch.py reports a launch here while a `record` is collecting."""
    launches = getattr(_recording, "launches", None)
    if launches is not None:
        launches.append((spec, config, bytes(memoryview(params).cast("B")), type(params), engine, tuple(tensors),
                         dict((name, getattr(params, name)) for name, t in params._fields_ if t is ctypes.c_void_p)))


def _file(t: Table, args: tuple, launches: list, result) -> None:
    plan = describe(t, args, launches, result)
    if plan is not None:
        t._table.add(args, plan)


def _fresh(x) -> bool:
    """A tensor the op allocated for itself: contiguous, alone in its storage."""
    return (x.__class__ is torch.Tensor and x.is_contiguous() and x.storage_offset() == 0 and not x.requires_grad
            and x.untyped_storage().nbytes() == x.numel() * x.element_size() and x.layout == torch.strided)


def describe(t: Table, args: tuple, launches: list, result):
    """The C++ plan of a recorded call, or None when some part of it cannot be replayed."""
    if not launches or not t._table.keyable(*args):
        return None
    single = result.__class__ is torch.Tensor
    outputs = (result,) if single else result
    if not isinstance(outputs, tuple) or not all(_fresh(o) for o in outputs):
        return None
    storages = [o.untyped_storage().data_ptr() for o in outputs if o.numel()]
    if len(set(storages)) != len(storages):
        return None
    if any(a.__class__ is torch.Tensor and a.numel() and a.untyped_storage().data_ptr() in storages for a in args):
        return None  # an output that is (in) an argument: written, not allocated
    tensors = [(False, i, a) for i, a in enumerate(args) if a.__class__ is torch.Tensor] + \
              [(True, j, o) for j, o in enumerate(outputs)]
    out_desc = [(list(o.shape), o.dtype, o.device, j in t.zeroed) for j, o in enumerate(outputs)]
    described = []
    for spec, config, params, params_class, engine, launch_tensors, pointers in launches:
        if engine not in ("cuda", "sim") or spec.traced() or (engine == "cuda" and env.flag("FMO_SYNC_CHECK")):
            return None
        if not all(issubclass(ftype, ctypes._SimpleCData) for _, ftype in params_class._fields_):
            return None  # nested structs or arrays (a TMA descriptor embeds addresses): not patchable
        patches = []
        for name, value in pointers.items():
            if not value:
                continue  # a null pointer stays null
            owners = [(output, index) for output, index, x in tensors if x.numel() and x.data_ptr() == value]
            if len(owners) != 1:
                return None  # points elsewhere (a cached buffer, a workspace) or ambiguously
            patches.append((getattr(params_class, name).offset, *owners[0]))
        refs = []
        for x in launch_tensors:
            ref = next(((output, index) for output, index, y in tensors if y is x), None)
            if ref is None:
                return None
            refs.append(ref)
        if engine == "cuda":
            from .launch import cuda_function

            install_cuda_launcher()
            target = cuda_function(spec, launch_tensors[0].device).kernel.handle
        else:
            target = (spec, config, params_class)
        described.append((spec.entry_name(), params, patches, list(config.grid), list(config.block), config.shared_mem,
                          engine == "cuda", target, refs))
    return (out_desc, described, list(range(len(outputs))), single)


@contextlib.contextmanager
def sim_launch_replaced(hook):
    """Inside: a hit on the `sim` engine calls hook(target, params, tensors) instead of
    launching (bench/overhead_bench.py's kernel skip: the hit's host path alone is timed)."""
    m = module()
    if m is None:
        yield
        return
    previous = m.set_sim_hook(hook)
    try:
        yield
    finally:
        m.set_sim_hook(previous)


def install_cuda_launcher() -> None:
    """Hand the driver's cuLaunchKernel to the extension (cuda engine only)."""
    m = module()
    if m is None or _state.get("cuda_launcher"):
        return
    from . import cuda_driver

    m.set_launch_kernel(cuda_driver.launch_kernel_address())
    _state["cuda_launcher"] = True
