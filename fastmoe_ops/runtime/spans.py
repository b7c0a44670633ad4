"""Byte spans of tensors and arrays: the memory a kernel argument lets a launch touch.

The simulator's memory checker (FMO_SIM_MEMCHECK=1) allows a launch exactly these spans,
whether the tensors are passed directly (fastmoe_ops.sim) or behind a Params struct
(fastmoe_ops.runtime.launch): a view's elements from its lowest to its highest address,
not the whole storage it lives in, so a write one element past a slice is reported.
"""
from __future__ import annotations


def byte_span(address: int, shape, byte_strides, itemsize: int) -> tuple[int, int]:
    """(lowest address, bytes up to and including the highest element) of a strided view;
    (address, 0) when it has no element. Negative strides (numpy) reach below `address`."""
    if any(n == 0 for n in shape):
        return (address, 0)
    lo = hi = address
    for n, s in zip(shape, byte_strides):
        if s >= 0:
            hi += (n - 1) * s
        else:
            lo += (n - 1) * s
    return (lo, hi + itemsize - lo)


def tensor_span(t) -> tuple[int, int]:
    """The byte span of a torch tensor's view (strides in elements)."""
    size = t.element_size()
    return byte_span(t.data_ptr(), t.shape, [s * size for s in t.stride()], size)


def array_span(a) -> tuple[int, int]:
    """The byte span of a numpy array (strides in bytes)."""
    return byte_span(a.ctypes.data, a.shape, a.strides, a.itemsize)
