"""Launchers of the MoE row-movement kernels (csrc/moe/permute.cuh).

gather_rows:   src [S, ...] any dtype, rows contiguous inside -> out [M, ...]: out[m] = src[index[m]]
               (zeros for -1); index [M] int64.
gather_reduce: y [S, H] bf16 | fp16 | fp32, index [M, J] int64, weights [M, J] fp32 or None
               -> out [M, H] y.dtype, the fixed-order (ascending j) fp32 sum.
The grid is a pure function of the row count and the SM budget (identical on every rank).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import sm_budget
from ..errors import UnsupportedError, expect
from ..runtime.launch import LaunchConfig, launch
from ..runtime.spec import CUDA_TYPE, KernelSpec, Params, check_element_type, check_vector_width, register_op

BLOCK_THREADS = 128
CTAS_PER_SM = 4          # rows are independent: enough CTAs to cover latency, then grid-stride
_CHUNK_TYPES = {16: ("uint32_t", 4), 8: ("uint32_t", 2), 4: ("uint32_t", 1), 2: ("uint16_t", 1), 1: ("uint8_t", 1)}
_REDUCE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class MoeGatherParams(Params):
    cpp_name = "fmo::MoeGatherParams"
    _fields_ = [
        ("src", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("index", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("row_bytes", ctypes.c_int64),
        ("src_stride", ctypes.c_int64),
    ]


class MoeGatherReduceParams(Params):
    cpp_name = "fmo::MoeGatherReduceParams"
    _fields_ = [
        ("y", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("index", ctypes.c_void_p),
        ("weights", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("hidden", ctypes.c_int64),
        ("fanin", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class MoeGatherSpec(KernelSpec):
    chunk_bytes: int      # bytes per access: 16 when rows, stride and pointers allow

    op: ClassVar[str] = "moe_gather_rows"
    header: ClassVar[str] = "csrc/moe/permute.cuh"
    params: ClassVar[type[Params]] = MoeGatherParams

    def check(self) -> None:
        super().check()
        if self.chunk_bytes not in _CHUNK_TYPES:
            raise UnsupportedError(f"{self.op}: chunk_bytes must be one of {sorted(_CHUNK_TYPES)}, got {self.chunk_bytes}")

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        elem, n = _CHUNK_TYPES[self.chunk_bytes]
        return f"fmo::moe_gather_rows<{elem}, {n}, {BLOCK_THREADS}>(p)"


@dataclass(frozen=True)
class MoeGatherReduceSpec(KernelSpec):
    dtype: str            # bf16 | fp16 | fp32 (accumulation is fp32)
    vec_width: int        # elements per access: 16 bytes when aligned, else 1
    weighted: bool        # multiply by weights[m, j] (unpermute) or not (combine)

    op: ClassVar[str] = "moe_gather_reduce"
    header: ClassVar[str] = "csrc/moe/permute.cuh"
    params: ClassVar[type[Params]] = MoeGatherReduceParams

    def check(self) -> None:
        super().check()
        check_element_type(self.op, self.dtype)
        check_vector_width(self.op, self.dtype, self.vec_width)

    def block_threads(self) -> int:
        return BLOCK_THREADS

    def device_call(self) -> str:
        return (f"fmo::moe_gather_reduce<{CUDA_TYPE[self.dtype]}, {self.vec_width}, "
                f"{'true' if self.weighted else 'false'}, {BLOCK_THREADS}>(p)")


@register_op("moe_gather_rows")
def gather_specs():
    for chunk in sorted(_CHUNK_TYPES):
        yield MoeGatherSpec(chunk_bytes=chunk)


@register_op("moe_gather_reduce")
def gather_reduce_specs():
    for dtype in ("bf16", "fp16", "fp32"):
        for vec in (1, 16 // (4 if dtype == "fp32" else 2)):
            for weighted in (False, True):
                yield MoeGatherReduceSpec(dtype=dtype, vec_width=vec, weighted=weighted)


def grid_for(rows: int) -> int:
    """CTAs for `rows` independent rows: a pure function of (rows, SM budget)."""
    return max(1, min(rows, sm_budget().num_sms * CTAS_PER_SM))


def _chunk_bytes(*values: int) -> int:
    return next(c for c in (16, 8, 4, 2, 1) if all(v % c == 0 for v in values))


def gather_rows(src: torch.Tensor, index: torch.Tensor, *, engine: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, *src.shape[1:]] = src[index] with zero rows for -1; engine 'cuda' or 'sim'.
    `out` (contiguous, that shape and dtype) is written in place when given."""
    expect(src.dim() >= 1, "src", "a tensor with a row dimension", f"shape {tuple(src.shape)}")
    expect(index.dtype == torch.int64 and index.dim() == 1, "index", "a 1-D int64 tensor", f"{index.dtype} {tuple(index.shape)}")
    inner = src[0] if src.shape[0] else src.new_empty(src.shape[1:])
    expect(src.shape[0] == 0 or inner.is_contiguous(), "src", "contiguous rows (any row stride)", f"strides {src.stride()}")
    index = index.contiguous()
    shape = (index.shape[0],) + tuple(src.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=src.dtype, device=src.device)
    expect(out.shape == shape and out.dtype == src.dtype and out.is_contiguous(), "out",
           f"a contiguous {src.dtype} tensor of shape {shape}", f"{out.dtype} {tuple(out.shape)}")
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    if index.shape[0] == 0 or row_bytes == 0:
        return out
    if src.shape[0] == 0:
        return out.zero_()                       # every index is -1
    src_stride = src.stride(0) * src.element_size()
    spec = MoeGatherSpec(chunk_bytes=_chunk_bytes(row_bytes, src_stride, src.data_ptr(), out.data_ptr()))
    params = MoeGatherParams(src=src.data_ptr(), out=out.data_ptr(), index=index.data_ptr(), rows=index.shape[0],
                             row_bytes=row_bytes, src_stride=src_stride)
    launch(spec, LaunchConfig.make(grid=grid_for(index.shape[0]), block=BLOCK_THREADS), params,
           engine=engine, tensors=(src, out, index))
    return out


def gather_reduce(y: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None, *, engine: str,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out [M, H] y.dtype: sum over j ascending of w[m, j] * y[index[m, j]]; engine 'cuda' or 'sim'."""
    expect(y.dtype in _REDUCE_DTYPES and y.dim() == 2, "y", "a 2-D bf16/fp16/fp32 tensor", f"{y.dtype} {tuple(y.shape)}")
    expect(index.dtype == torch.int64 and index.dim() == 2, "index", "a 2-D int64 tensor", f"{index.dtype} {tuple(index.shape)}")
    if weights is not None:
        expect(weights.dtype == torch.float32 and weights.shape == index.shape, "weights",
               f"fp32 of shape {tuple(index.shape)}", f"{weights.dtype} {tuple(weights.shape)}")
        weights = weights.contiguous()
    y, index = y.contiguous(), index.contiguous()
    m, h = index.shape[0], y.shape[1]
    if out is None:
        out = torch.empty(m, h, dtype=y.dtype, device=y.device)
    expect(out.shape == (m, h) and out.dtype == y.dtype and out.is_contiguous(), "out",
           f"a contiguous {y.dtype} tensor of shape {(m, h)}", f"{out.dtype} {tuple(out.shape)}")
    if m == 0 or h == 0 or y.shape[0] == 0:
        return out.zero_()
    vec = 16 // y.element_size()
    aligned = h % vec == 0 and y.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
    spec = MoeGatherReduceSpec(dtype=_REDUCE_DTYPES[y.dtype], vec_width=vec if aligned else 1, weighted=weights is not None)
    params = MoeGatherReduceParams(y=y.data_ptr(), out=out.data_ptr(), index=index.data_ptr(),
                                   weights=weights.data_ptr() if weights is not None else 0, rows=m, hidden=h,
                                   fanin=index.shape[1])
    tensors = (y, out, index) + ((weights,) if weights is not None else ())
    launch(spec, LaunchConfig.make(grid=grid_for(m), block=BLOCK_THREADS), params, engine=engine, tensors=tensors)
    return out
