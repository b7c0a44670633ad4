"""Tiled TMA tensor maps (the 128-byte CUtensorMap a kernel receives as `fmo::ptx::TmaDescriptor`).

`encode_tiled(tensor, box, swizzle=..., engine=...)` validates everything the hardware and the
driver require before any kernel runs, then encodes: on CUDA through the driver's
cuTensorMapEncodeTiled (reached through `runtime/cuda_driver.py`, the one driver adapter); on
the simulator with our own layout, which ptx/tma.cuh's emulation decodes (the simulator has no
driver). Dimensions are given innermost first, as the driver and the PTX coordinates take them:
a row-major [rows, cols] tensor is dims (cols, rows), and `box` is (box_cols, box_rows).

Kernels take the bytes inside their Params struct (passed `const __grid_constant__`):
`TMA_DESCRIPTOR` is the ctypes field type. A TmaDescriptor member sits at a multiple of 64 bytes
and makes the struct's size a multiple of 64 (C++ `alignas(64)`), which ctypes (Python 3.11)
cannot say: build the mirror's `_fields_` with `aligned_fields([...])`, which inserts `_pad*`
fields where C++ pads (Params.layout_asserts skips them and checks every real offset and the
size).
"""
from __future__ import annotations

import ctypes
import struct
from typing import Sequence

import torch

from ..errors import InputError

TMA_DESCRIPTOR = ctypes.c_uint64 * 16  # 128 bytes; its offset in Params must be a multiple of 64
SWIZZLES = (0, 32, 64, 128)  # bytes of the swizzle span (0: none)
MAX_BOX = 256
SIM_MAGIC = 0x31_50_41_4D_54_4F_4D_46  # "FMOTMAP1", little endian (ptx/tma.cuh: kTmaMagic)

# CUtensorMapDataType values (cuda.h), and our simulator's dtype codes (1: f32, reducible)
_CU_DTYPE = {
    torch.uint8: 0, torch.float8_e4m3fn: 0, torch.float8_e5m2: 0, torch.int8: 0,
    torch.uint16: 1, torch.int16: 1, torch.uint32: 2, torch.int32: 3, torch.int64: 5,
    torch.float16: 6, torch.float32: 7, torch.float64: 8, torch.bfloat16: 9,
}
_SIM_DTYPE = {torch.float32: 1}


def aligned_fields(fields: list[tuple[str, type]]) -> list[tuple[str, type]]:
    """`fields` with `_pad<i>` byte arrays inserted so that every TMA_DESCRIPTOR field starts at
    a multiple of 64 and, if there is one, the total size is a multiple of 64 (C++ layout of a
    struct with an alignas(64) member)."""
    out, offset, has_desc = [], 0, False
    for name, ctype in fields:
        align = 64 if ctype is TMA_DESCRIPTOR else ctypes.alignment(ctype)
        has_desc |= ctype is TMA_DESCRIPTOR
        pad = -offset % align
        if pad:
            out.append((f"_pad{len(out)}", ctypes.c_uint8 * pad))
            offset += pad
        out.append((name, ctype))
        offset += ctypes.sizeof(ctype)
    tail = -offset % 64 if has_desc else 0
    if tail:
        out.append((f"_pad{len(out)}", ctypes.c_uint8 * tail))
    return out


def _check(tensor, box: Sequence[int], swizzle: int, oob_fill: str) -> tuple[list[int], list[int], list[int], int]:
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"tensor map: tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _CU_DTYPE:
        raise InputError(f"tensor map: tensor: dtype {tensor.dtype} has no TMA data type "
                         f"(expected one of {sorted(str(d) for d in _CU_DTYPE)})")
    rank = tensor.dim()
    if not 1 <= rank <= 5:
        raise InputError(f"tensor map: tensor: rank must be 1..5, got {rank}")
    esize = tensor.element_size()
    dims = [int(s) for s in reversed(tensor.shape)]
    strides = [int(s) * esize for s in reversed(tensor.stride())]
    if strides[0] != esize:
        raise InputError(f"tensor map: tensor: the innermost dimension must be contiguous (stride 1), got stride "
                         f"{tensor.stride()[-1]}")
    for d, n in enumerate(dims):
        if not 1 <= n <= 2 ** 32:
            raise InputError(f"tensor map: tensor: dimension {d} (innermost first) must be in 1..2^32, got {n}")
    for d, s in enumerate(strides[1:], start=1):
        if s % 16 != 0 or not 0 < s < 2 ** 40:
            raise InputError(f"tensor map: tensor: stride of dimension {d} (innermost first) must be a positive "
                             f"multiple of 16 bytes below 2^40, got {s} bytes")
    if tensor.data_ptr() % 16 != 0:
        raise InputError(f"tensor map: tensor: address must be 16-byte aligned, got {tensor.data_ptr():#x}")
    box = list(box)
    if len(box) != rank or not all(isinstance(b, int) for b in box):
        raise InputError(f"tensor map: box: expected {rank} ints (innermost first), got {box!r}")
    for d, b in enumerate(box):
        if not 1 <= b <= MAX_BOX:
            raise InputError(f"tensor map: box: dimension {d} must be in 1..{MAX_BOX}, got {b}")
    inner = box[0] * esize
    if inner % 16 != 0:
        raise InputError(f"tensor map: box: the innermost box row must be a multiple of 16 bytes, got {box[0]} x "
                         f"{esize} = {inner} bytes")
    if swizzle not in SWIZZLES:
        raise InputError(f"tensor map: swizzle: expected one of {SWIZZLES} (bytes; 0 = none), got {swizzle!r}")
    if swizzle and inner != swizzle:
        # The driver allows inner <= span; we require equality so that the smem image is the
        # dense box on both engines (the case the kernels use and the conformance tests cover).
        raise InputError(f"tensor map: box: with the {swizzle}B swizzle the innermost box row must be {swizzle} "
                         f"bytes, got {inner}")
    if oob_fill != "zero":
        raise InputError(f"tensor map: oob_fill: only 'zero' is supported, got {oob_fill!r}")
    return dims, strides, box, esize


def encode_tiled(tensor: torch.Tensor, box: Sequence[int], *, swizzle: int = 0, oob_fill: str = "zero",
                 engine: str) -> bytes:
    """The 128-byte tiled tensor map of `tensor` (boxes of `box` elements, innermost first).

    Hot path (a launch encodes up to three maps per call): everything `_check` validates but
    the address is a function of (engine, device kind, dtype, shape, strides, box and its
    element classes, swizzle, oob_fill), so a repeat of that geometry skips the checks; the
    address's alignment is checked every call. The simulator's map is then the cached
    geometry with the address patched in; the driver's map is opaque, so a CUDA encoding is
    reused only for the same geometry *and* address (weights, the caching allocator's recurring
    activation buffers), else cuTensorMapEncodeTiled runs again."""
    if tensor.__class__ is not torch.Tensor:  # subclasses, non-tensors: the full check every time
        return _encode(tensor, box, swizzle, oob_fill, engine)
    box = box if box.__class__ is tuple else tuple(box)
    key = (engine, tensor.is_cpu, tensor.is_cuda, tensor.dtype, tensor.shape, tensor.stride(), box, tuple(map(type, box)),
           swizzle, swizzle.__class__, oob_fill)
    address = tensor.data_ptr()
    try:
        geometry = _geometries.get(key)
    except TypeError:  # an unhashable argument (a list for swizzle): _check refuses it
        return _encode(tensor, box, swizzle, oob_fill, engine)
    if geometry is None or address % 16:
        data = _encode(tensor, box, swizzle, oob_fill, engine)  # raises on bad input: nothing kept
        if len(_geometries) >= _CACHE_LIMIT:
            _geometries.clear()
        # sim: the map without its address (word 1); cuda: the last few encodings by address
        _geometries[key] = data[:8] + bytes(8) + data[16:] if engine == "sim" else {address: data}
        return data
    if engine == "sim":
        return geometry[:8] + address.to_bytes(8, "little") + geometry[16:]
    data = geometry.get(address)
    if data is None:
        data = _encode(tensor, box, swizzle, oob_fill, engine)
        if len(geometry) >= _ADDRESSES_PER_GEOMETRY:
            geometry.clear()
        geometry[address] = data
    return data


_geometries: dict = {}
_CACHE_LIMIT = 4096           # geometries (token counts vary per batch); rebuilding one is cheap
_ADDRESSES_PER_GEOMETRY = 64  # cuda: encodings kept per geometry


def _encode(tensor, box, swizzle, oob_fill, engine) -> bytes:
    dims, strides, box, esize = _check(tensor, box, swizzle, oob_fill)
    if engine == "sim":
        return _encode_sim(tensor, dims, strides, box, esize, swizzle)
    if engine == "cuda":
        if tensor.device.type != "cuda":
            raise InputError(f"tensor map: tensor: engine cuda needs a CUDA tensor, got device {tensor.device}")
        from . import cuda_driver

        return cuda_driver.tensor_map_encode_tiled(_CU_DTYPE[tensor.dtype], tensor.data_ptr(), dims, strides[1:],
                                                   box, swizzle)
    raise InputError(f"tensor map: engine: expected 'sim' or 'cuda', got {engine!r}")


def _encode_sim(tensor, dims, strides, box, esize, swizzle) -> bytes:
    if tensor.device.type != "cpu":
        raise InputError(f"tensor map: tensor: engine sim needs a CPU tensor, got device {tensor.device}")
    rank = len(dims)
    w = [0] * 16
    w[0] = SIM_MAGIC
    w[1] = tensor.data_ptr()
    w[2] = rank | esize << 8 | (swizzle // 32) << 16 | _SIM_DTYPE.get(tensor.dtype, 0) << 32
    for d in range(rank):
        w[3 + d] = dims[d]
    for d in range(1, rank):
        w[7 + d] = strides[d]
    for d, b in enumerate(box):
        w[12 + d // 4] |= b << (16 * (d % 4))
    return struct.pack("<16Q", *w)


def descriptor(data: bytes) -> ctypes.Array:
    """The bytes as a TMA_DESCRIPTOR value (a Params field, or a kernel argument by value)."""
    if len(data) != 128:
        raise InputError(f"tensor map: expected 128 bytes, got {len(data)}")
    return TMA_DESCRIPTOR.from_buffer_copy(data)  # one copy (unpacking 16 words costs microseconds)
