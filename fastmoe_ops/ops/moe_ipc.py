"""Launchers of the intra-node MoE transport kernels (csrc/moe/ipc.cuh; with static=True
their static-shape forms, csrc/moe/ipc_static.cuh: counts exchanged on the device).

Both launch exactly `sm_budget().comm_sms` persistent CTAs inside
`communication_in_flight()`, so compute kernels size their grids around them.
dispatch: packed rows of up to 4 streams (x, FP8 scales, topk ids, weights) into peers'
buffers, then out of this rank's buffer into the receive tensors; dispatch_fp8: the same with
x quantised per 1 x 128 group on the way out (the FP8 pair's packed row).
combine:  rows y [N, H] back into their sources' buffers, then the fixed-order sum
-> out [T, H] (bf16 | fp16 | fp32).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import communication_in_flight, sm_budget
from ..errors import UnsupportedError
from ..runtime.launch import LaunchConfig, launch
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, check_element_type, check_vector_width, register_op

BLOCK_THREADS = 128
MAX_RANKS = 8
MAX_STREAMS = 4
_CHUNKS = {16: "fmo::Vec<uint32_t, 4>", 8: "fmo::Vec<uint32_t, 2>", 4: "fmo::Vec<uint32_t, 1>",
           2: "fmo::Vec<uint16_t, 1>", 1: "fmo::Vec<uint8_t, 1>"}
_I64R = ctypes.c_int64 * MAX_RANKS
_I64S = ctypes.c_int64 * MAX_STREAMS


class MoeIpcParams(Params):
    cpp_name = "fmo::MoeIpcParams"
    _fields_ = [
        ("peers", ctypes.c_void_p * MAX_RANKS),
        ("src", ctypes.c_void_p * MAX_STREAMS),
        ("out", ctypes.c_void_p * MAX_STREAMS),
        ("src_stride", _I64S),
        ("seg_bytes", _I64S),
        ("seg_offset", _I64S),
        ("recv_counts", _I64R),
        ("back_offset", _I64R),
        ("send_pos", ctypes.c_void_p),
        ("combine_index", ctypes.c_void_p),
        ("tokens", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("ranks", ctypes.c_int64),
        ("num_streams", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("slot_rows", ctypes.c_int64),
        ("dispatch_region", ctypes.c_int64),
        ("combine_region", ctypes.c_int64),
        ("expected", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("topk_idx", ctypes.c_void_p),
        ("send_counts", ctypes.c_void_p),
        ("matrix", ctypes.c_void_p),
        ("topk", ctypes.c_int64),
        ("num_experts", ctypes.c_int64),
        ("num_worst", ctypes.c_int64),
        ("fill_stream", ctypes.c_int64),
        ("static_region", ctypes.c_int64),
        ("timeout_ns", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


@dataclass(frozen=True)
class MoeIpcDispatchSpec(KernelSpec):
    chunk_bytes: int       # bytes per access (16 when every row, offset and pointer allows)
    static: bool = False   # counts exchanged on the device, num_worst rows out (ipc_static.cuh)

    op: ClassVar[str] = "moe_ipc_dispatch"
    header: ClassVar[str] = "csrc/moe/ipc_static.cuh"   # (includes ipc.cuh)
    params: ClassVar[type[Params]] = MoeIpcParams

    def check(self) -> None:
        super().check()
        if self.chunk_bytes not in _CHUNKS:
            raise UnsupportedError(f"{self.op}: chunk_bytes must be one of {sorted(_CHUNKS)}, got {self.chunk_bytes}")

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        if self.static:
            return f"fmo::moe_ipc_static_dispatch<{_CHUNKS[self.chunk_bytes]}, {BLOCK_THREADS}, false>(p)"
        return f"fmo::moe_ipc_dispatch<{_CHUNKS[self.chunk_bytes]}, {BLOCK_THREADS}>(p)"


@dataclass(frozen=True)
class MoeIpcDispatchFp8Spec(KernelSpec):
    """dispatch that quantises x (dtype) per 1 x 128 group on its way out: e4m3 codes and fp32
    scales in the packed row (csrc/quant/fp8_scale.cuh's contract; quantize_per_token_group's)."""

    dtype: str             # x: bf16 | fp16 | fp32
    vec_width: int         # elements of x per load: 16 bytes when rows and x allow, else 1
    chunk_bytes: int       # bytes per access of the other streams' copies
    static: bool = False   # counts exchanged on the device, num_worst rows out (ipc_static.cuh)

    op: ClassVar[str] = "moe_ipc_dispatch_fp8"
    header: ClassVar[str] = "csrc/moe/ipc_static.cuh"   # (includes ipc.cuh)
    params: ClassVar[type[Params]] = MoeIpcParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        check_vector_width(self.op, self.dtype, self.vec_width)
        if self.chunk_bytes not in _CHUNKS:
            raise UnsupportedError(f"{self.op}: chunk_bytes must be one of {sorted(_CHUNKS)}, got {self.chunk_bytes}")

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        if self.static:
            return (f"fmo::moe_ipc_static_dispatch<{_CHUNKS[self.chunk_bytes]}, {BLOCK_THREADS}, true, "
                    f"{CUDA_TYPE[self.dtype]}, {self.vec_width}>(p)")
        return (f"fmo::moe_ipc_dispatch_fp8<{CUDA_TYPE[self.dtype]}, {self.vec_width}, {_CHUNKS[self.chunk_bytes]}, "
                f"{BLOCK_THREADS}>(p)")


@dataclass(frozen=True)
class MoeIpcCombineSpec(KernelSpec):
    dtype: str             # bf16 | fp16 | fp32
    chunk_bytes: int       # bytes per access of the send phase
    vec_width: int         # elements per access of the reduce phase
    static: bool = False   # the dispatch's counts read on the device (ipc_static.cuh)

    op: ClassVar[str] = "moe_ipc_combine"
    header: ClassVar[str] = "csrc/moe/ipc_static.cuh"   # (includes ipc.cuh)
    params: ClassVar[type[Params]] = MoeIpcParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        if self.chunk_bytes not in _CHUNKS:
            raise UnsupportedError(f"{self.op}: chunk_bytes must be one of {sorted(_CHUNKS)}, got {self.chunk_bytes}")
        check_vector_width(self.op, self.dtype, self.vec_width)

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        name = "moe_ipc_static_combine" if self.static else "moe_ipc_combine"
        return f"fmo::{name}<{CUDA_TYPE[self.dtype]}, {_CHUNKS[self.chunk_bytes]}, {self.vec_width}, {BLOCK_THREADS}>(p)"


@register_op("moe_ipc_dispatch")
def dispatch_specs():
    for chunk in (4, 16):
        for static in (False, True):
            yield MoeIpcDispatchSpec(chunk_bytes=chunk, static=static)


@register_op("moe_ipc_dispatch_fp8")
def dispatch_fp8_specs():
    for dtype, vec in (("bf16", 8), ("fp16", 8), ("fp32", 4)):
        for static in (False, True):
            yield MoeIpcDispatchFp8Spec(dtype=dtype, vec_width=vec, chunk_bytes=16, static=static)


@register_op("moe_ipc_combine")
def combine_specs():
    for dtype, vec in (("bf16", 8), ("fp16", 8), ("fp32", 4)):   # every dtype combine accepts
        for static in (False, True):
            yield MoeIpcCombineSpec(dtype=dtype, chunk_bytes=16, vec_width=vec, static=static)


def chunk_bytes(*values: int) -> int:
    return next(c for c in (16, 8, 4, 2, 1) if all(v % c == 0 for v in values))


def comm_grid() -> int:
    """The grid of every transport kernel: the communication SM budget (the caller checks
    that all ranks agree: the completion counters count CTAs)."""
    return sm_budget().comm_sms


def run(spec: KernelSpec, params: MoeIpcParams, grid: int, *, engine: str, tensors) -> None:
    """Launch `spec` with `grid` (= comm_grid()) persistent CTAs while communication is in flight."""
    with communication_in_flight():
        launch(spec, LaunchConfig.make(grid=grid, block=BLOCK_THREADS), params, engine=engine, tensors=tuple(tensors))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
