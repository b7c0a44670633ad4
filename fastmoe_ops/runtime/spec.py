"""Kernel specs: compile-time choices as a frozen dataclass, and the stub generated from them.

A spec names one kernel variant. Its fields are the compile-time choices (tile sizes,
dtypes, group size...); run-time values travel in a `Params` struct passed by value. The
stub is the only generated code: an `#include` of the shipped template and one readable
`extern "C"` entry point that forwards the Params to it, plus `static_assert`s that pin the
C++ struct layout to the Python mirror, so a drift between the two cannot compile.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import ClassVar

from .. import env
from ..errors import UnsupportedError

# CUDA's spelling of the dtypes a spec can name; one table for every kernel.
CUDA_TYPE = {
    "bf16": "__nv_bfloat16",
    "fp16": "__half",
    "fp32": "float",
    "e4m3": "__nv_fp8_e4m3",
    "e5m2": "__nv_fp8_e5m2",
}


ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "e4m3": 1, "e5m2": 1}
FLOAT_INPUTS = ("bf16", "fp16", "fp32")


def check_element_type(op: str, dtype: str, allowed=FLOAT_INPUTS) -> None:
    """Refuse a dtype outside `allowed` (one message for every spec)."""
    if dtype not in allowed:
        names = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise UnsupportedError(f"{op}: dtype must be {names}, got {dtype!r}")


def vector_width(dtype: str) -> int:
    """Elements of `dtype` in one 16-byte access (LDG.128 / STG.128)."""
    return 16 // ELEMENT_BYTES[dtype]


def check_vector_width(op: str, dtype: str, vec_width: int) -> None:
    """A kernel moves either single elements or 16-byte vectors."""
    if vec_width not in (1, vector_width(dtype)):
        raise UnsupportedError(f"{op}: vec_width must be 1 or {vector_width(dtype)} for {dtype}, got {vec_width}")


class Params(ctypes.Structure):
    """Base of every kernel's run-time parameter struct (mirrors a C++ struct by layout).

    Subclasses set `_fields_` and `cpp_name`; `layout_asserts()` emits the static_asserts."""

    cpp_name: ClassVar[str] = ""

    @classmethod
    def layout_asserts(cls) -> str:
        lines = [
            f'static_assert(sizeof({cls.cpp_name}) == {ctypes.sizeof(cls)}, '
            f'"{cls.cpp_name}: size differs from the Python mirror {cls.__name__}");',
            # NVRTC 13.0 has no constant-expression offsetof; nvcc (build report) and the
            # simulator's host compiler check every offset of the same struct.
            "#ifndef __CUDACC_RTC__",
        ]
        for name, _ in cls._fields_:
            if name.startswith("_pad"):  # explicit padding (runtime/tensor_map.py: aligned_fields), not in C++
                continue
            offset = getattr(cls, name).offset
            lines.append(
                f'static_assert(offsetof({cls.cpp_name}, {name}) == {offset}, '
                f'"{cls.cpp_name}::{name}: offset differs from the Python mirror");'
            )
        lines.append("#endif")
        return "\n".join(lines)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self._fields_)
        return f"{type(self).__name__}({fields})"


class TraceArgs(Params):
    """The trace parameter of a traced kernel (csrc/common/trace.cuh, fmo::trace::Args)."""

    cpp_name = "fmo::trace::Args"
    _fields_ = [
        ("records", ctypes.c_void_p),   # fmo::trace::Record[capacity]
        ("count", ctypes.c_void_p),     # unsigned long long: events appended (> capacity: overflow)
        ("capacity", ctypes.c_uint32),
        ("launch_id", ctypes.c_uint32),
    ]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Base class. Subclasses are frozen dataclasses whose fields are compile-time choices.

    Class attributes a subclass sets:
      op:       the op's one name (`fp8_quant_token_group`), prefix of every entry point
      header:   the shipped template, relative to the kernel root (`csrc/quant/fp8_quant.cuh`)
      params:   the Params subclass passed by value
    and methods `device_call()` (the C++ expression the entry forwards to, given `p`),
    `block_threads()` and `check()` (refuse unsupported combinations with UnsupportedError).
    """

    op: ClassVar[str] = ""
    header: ClassVar[str] = ""
    params: ClassVar[type[Params]] = Params
    traceable: ClassVar[bool] = True  # False: never wrapped in the kernel trace (the trace's own probes)

    # -- what subclasses provide -------------------------------------------------------
    def device_call(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_threads(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self) -> None:
        """Refuse unsupported combinations. Subclasses extend; base checks field types."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and not isinstance(value, int):
                raise UnsupportedError(f"{type(self).__name__}.{field.name}: expected int, got {value!r}")

    def min_blocks_per_sm(self) -> int:
        return 1

    def traced(self) -> bool:
        """Whether a launch now uses the traced build (FMO_TRACE=1 and the spec is traceable)."""
        return self.traceable and env.flag("FMO_TRACE")

    # -- derived ----------------------------------------------------------------------
    def entry_name(self) -> str:
        """Readable kernel name, e.g. `fmo_fp8_quant_token_group_bf16_g128_vec4`."""
        parts = [f"fmo_{self.op}"]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                if value:
                    parts.append(field.name)
            elif isinstance(value, str):
                parts.append(value)
            else:
                parts.append(f"{_abbrev(field.name)}{value}")
        return "_".join(parts)

    def key(self) -> dict:
        """Everything about this variant that changes code (the runtime adds the rest)."""
        return {"spec": type(self).__name__, "fields": dataclasses.asdict(self), "stub": self.stub()}

    def stub(self, traced: bool | None = None) -> str:
        """The generated source. `traced` (default: FMO_TRACE) wraps the body in the kernel
        trace (csrc/common/trace.cuh): a second parameter carries the trace buffer, thread 0
        appends the CTA's start event, and after the body (whose early returns come back
        here) a barrier and the end event. Untraced stubs are unchanged: tracing costs nothing then."""
        self.check()
        traced = self.traced() if traced is None else traced and self.traceable
        name = self.entry_name()
        head = (
            f'// generated by fastmoe_ops for {type(self).__name__}{dataclasses.astuple(self)}\n'
            f'#ifndef __CUDACC_RTC__\n#include <cstddef>\n#endif\n'
            f'#include "{self.header}"\n'
        )
        signature = (
            f'extern "C" __global__ void __launch_bounds__({self.block_threads()}, {self.min_blocks_per_sm()})\n'
            # const __grid_constant__: p stays in parameter space with an address (TMA reads
            # descriptors in Params from there; ptx/tma.cuh), never copied to local memory.
            f'{name}(const __grid_constant__ {self.params.cpp_name} p'
        )
        if not traced:
            return (f'{head}{self.params.layout_asserts()}\n{signature}) {{\n'
                    f'    {self.device_call()};\n'
                    f'}}\n')
        return (
            f'{head}#include "csrc/common/trace.cuh"\n'
            f'{self.params.layout_asserts()}\n{TraceArgs.layout_asserts()}\n'
            f'{signature}, {TraceArgs.cpp_name} fmo_trace) {{\n'
            f'    fmo::trace::begin(fmo_trace);\n'
            f'    {self.device_call()};\n'
            f'    fmo::trace::end(fmo_trace);\n'
            f'}}\n'
        )


_ABBREV = {"group_size": "g", "block_size": "b", "vec_width": "vec", "block_m": "bm", "block_n": "bn", "block_k": "bk", "stages": "s"}


def _abbrev(field_name: str) -> str:
    return _ABBREV.get(field_name, field_name)


_registry: dict[str, type] = {}


def register_op(op: str):
    """Decorator: register `enumerate_specs()` -> the specs the heuristics can choose for
    the standard shapes; the build report compiles exactly these."""

    def decorate(enumerate_specs):
        _registry[op] = enumerate_specs
        return enumerate_specs

    return decorate


def registered_specs():
    for op in sorted(_registry):
        yield from _registry[op]()
