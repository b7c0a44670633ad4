"""Launchers of the low-latency (decode) MoE kernels (csrc/moe/low_latency.cuh).

dispatch: x [T, H] bf16 | fp16 (or quantised on the way: e4m3 codes + fp32 1x128 scales)
          -> recv_x [E_local, R*M, H] in the masked layout, masked_m [E_local] int32;
combine:  y [E_local, R*M, H] -> out [T, H], each token's expert rows summed in slot order,
          weighted by topk_weights.
Each launch runs a phase ("send", "recv") or both; `grid` CTAs of BLOCK_THREADS (the
communication SM budget fixed when the Buffer was built: the counters count CTAs), on the
caller's current stream, inside `communication_in_flight()`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from ..budget import communication_in_flight
from ..errors import UnsupportedError
from ..runtime.launch import LaunchConfig, launch
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, register_op
from . import moe_ipc

BLOCK_THREADS = moe_ipc.BLOCK_THREADS
MAX_RANKS = 8
MAX_TOPK = 16
DTYPES = ("bf16", "fp16")       # 2-byte rows: the combine region holds H * 2 bytes per slot
PHASES = ("both", "send", "recv")
VEC = 8                          # elements per 16-byte access of a 2-byte dtype


class MoeLlParams(Params):
    cpp_name = "fmo::MoeLlParams"
    _fields_ = [
        ("peers", ctypes.c_void_p * MAX_RANKS),
        ("x", ctypes.c_void_p),
        ("topk_idx", ctypes.c_void_p),
        ("slot_index", ctypes.c_void_p),
        ("topk_weights", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_scales", ctypes.c_void_p),
        ("masked_m", ctypes.c_void_p),
        ("recv_counts", ctypes.c_void_p),
        ("tokens", ctypes.c_int64),
        ("topk", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("num_experts", ctypes.c_int64),
        ("per", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("ranks", ctypes.c_int64),
        ("max_tokens", ctypes.c_int64),
        ("row_stride", ctypes.c_int64),
        ("scale_offset", ctypes.c_int64),
        ("status_offset", ctypes.c_int64),
        ("counts_region", ctypes.c_int64),
        ("dispatch_region", ctypes.c_int64),
        ("combine_region", ctypes.c_int64),
        ("signals", ctypes.c_int64),
        ("timeout_ns", ctypes.c_int64),
        ("min_amax", ctypes.c_float),
        ("reserved", ctypes.c_int32),
    ]


def _phases(phase: str) -> str:
    return {"both": "true, true", "send": "true, false", "recv": "false, true"}[phase]


@dataclass(frozen=True)
class _MoeLlSpec(KernelSpec):
    """What the low-latency dispatch and combine kernels share: the element type, the phase
    (both halves, or send / receive apart for the receive hook), the block and the params."""
    dtype: str             # x (dispatch) or y, out (combine): bf16 | fp16
    phase: str             # both | send | recv

    header: ClassVar[str] = "csrc/moe/low_latency.cuh"
    params: ClassVar[type[Params]] = MoeLlParams

    def check(self) -> None:
        super().check()
        if self.dtype not in DTYPES:
            raise UnsupportedError(f"{self.op}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.phase not in PHASES:
            raise UnsupportedError(f"{self.op}: phase must be one of {PHASES}, got {self.phase!r}")

    def block_threads(self) -> int:
        return BLOCK_THREADS


@dataclass(frozen=True)
class MoeLlDispatchSpec(_MoeLlSpec):
    quantize: bool = False  # send e4m3 codes + fp32 scales (x quantised per 1 x 128 group)

    op: ClassVar[str] = "moe_ll_dispatch"

    def device_call(self) -> str:
        return (f"fmo::moe_ll_dispatch<{CUDA_TYPE[self.dtype]}, {str(self.quantize).lower()}, {VEC}, {BLOCK_THREADS}, "
                f"{_phases(self.phase)}>(p)")


@dataclass(frozen=True)
class MoeLlCombineSpec(_MoeLlSpec):
    weighted: bool = False  # topk_weights given at dispatch

    op: ClassVar[str] = "moe_ll_combine"

    def device_call(self) -> str:
        return (f"fmo::moe_ll_combine<{CUDA_TYPE[self.dtype]}, {VEC}, {str(self.weighted).lower()}, {BLOCK_THREADS}, "
                f"{_phases(self.phase)}>(p)")


@register_op("moe_ll_dispatch")
def dispatch_specs():
    for quantize in (False, True):
        for phase in PHASES:
            yield MoeLlDispatchSpec(dtype="bf16", quantize=quantize, phase=phase)


@register_op("moe_ll_combine")
def combine_specs():
    for phase in PHASES:
        yield MoeLlCombineSpec(dtype="bf16", weighted=True, phase=phase)


SHARED_BYTES = (BLOCK_THREADS // 32 + 1) * 4   # block sums and the wait's flag (dynamic)


def run(spec: KernelSpec, params: MoeLlParams, grid: int, *, engine: str, tensors) -> None:
    """Launch `spec` with `grid` CTAs (the Buffer's fixed grid) on the current stream while
    communication is in flight."""
    with communication_in_flight():
        launch(spec, LaunchConfig.make(grid=grid, block=BLOCK_THREADS, shared_mem=SHARED_BYTES), params, engine=engine,
               tensors=tuple(tensors))
