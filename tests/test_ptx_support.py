"""Shared machinery of the ptx/ wrapper tests (tests/test_ptx_*.py, tests/gpu/test_ptx_conformance.py).

A `Case` is one launch of a small test kernel with seeded inputs, poisoned outputs and a
check of the outputs against a numpy model of the PTX ISA's definition. The same case runs
on the simulator (`SimRunner`) and, in the GPU conformance test, on a real device
(`CudaRunner`), where the two engines' outputs are also compared with each other.

The tests in this file check the numpy models' own building blocks (the float decoders)
against PyTorch's dtypes, so that the models are not validated only by the code under test.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pytest
import torch

POISON_BYTE = 0xFF  # NaN as f32/f16/bf16, and what the simulator's un-landed cp.async shows

HEADERS = """
#include "ptx/common.cuh"
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/barrier.cuh"
using namespace fmo::ptx;
"""


# ------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One kernel launch. `args` are numpy arrays (become tensors) and numpy scalars
    (passed by value); `outputs` indexes the arrays that are poisoned and read back.
    `check(outs)` asserts the outputs against the model; `deterministic` says whether
    two engines must agree bit for bit (false where atomics' return order varies)."""

    name: str
    kernel: str
    grid: tuple
    block: tuple
    args: list
    outputs: Sequence[int]
    check: Callable[[list], None]
    shared_mem: int = 0
    deterministic: bool = True
    sim_only: bool = False  # relies on the simulator's defined behaviour of a GPU race/UB
    gpu_outputs: Sequence[int] | None = None  # outputs compared across engines (default: all)
    extra: dict = field(default_factory=dict)


def poisoned(shape, dtype) -> np.ndarray:
    a = np.empty(shape, dtype)
    a.view(np.uint8).fill(POISON_BYTE)
    return a


# ------------------------------------------------------------------------------ runners


def sim_or_skip():
    """The simulator module, or a skip with the reason it cannot be used."""
    try:
        from fastmoe_ops import sim
    except ImportError as e:  # the simulator is part of the package; missing = not built
        pytest.skip(f"fastmoe_ops.sim cannot be imported ({e}); build it with `pip install -e .`")
    if hasattr(sim, "available") and not sim.available():
        pytest.skip("fastmoe_ops.sim is present but its runtime is not built (pip install -e .)")
    return sim


def include_options() -> tuple[str, ...]:
    from fastmoe_ops.runtime.compiler import include_options as inc

    return tuple(inc())


class SimRunner:
    """Compiles `HEADERS + source` for the CPU SIMT simulator and runs cases on it."""

    engine = "sim"

    def __init__(self, source: str):
        sim = sim_or_skip()
        self.module = sim.RawModule(code=HEADERS + source, options=include_options())

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).copy())

    def launch(self, case: Case, tensors: list) -> None:
        fn = self.module.get_function(case.kernel)
        fn(case.grid, case.block, tuple(tensors), shared_mem=case.shared_mem)

    def run(self, case: Case) -> list[np.ndarray]:
        tensors = [self.to_device(a) if isinstance(a, np.ndarray) else a for a in case.args]
        self.launch(case, tensors)
        return [tensors[i].numpy().copy() for i in case.outputs]


class CudaRunner(SimRunner):
    """The same source on the current CUDA device: compiled for `arch` by the project's NVRTC
    path (disk-cached), loaded and launched through `fastmoe_ops.runtime.cuda_driver`, the
    library's one door to the driver. Arguments follow the simulator's (and CuPy's)
    convention: tensors pass as pointers, numpy scalars by value."""

    engine = "cuda"

    def __init__(self, source: str, arch: str):
        from fastmoe_ops.runtime import cuda_driver
        from fastmoe_ops.runtime.compiler import compile_nvrtc, cuda_include_dir

        extra = []
        inc = cuda_include_dir()
        if inc is not None:  # NVRTC has no C++ standard headers: ptx/ uses CCCL's (include/cccl)
            extra.append(f"-I{inc / 'cccl'}")
        self.cubin = compile_nvrtc(HEADERS + source, "ptx_conformance", arch, tuple(extra)).cubin
        self.module = cuda_driver.Module(self.cubin.read_bytes(), "ptx_conformance")
        self.kernels = {}  # name -> cuda_driver.Kernel

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).copy()).cuda()

    def launch(self, case: Case, tensors: list) -> None:
        from fastmoe_ops.runtime.launch import LaunchConfig
        from fastmoe_ops.sim.launch import pack_one

        kernel = self.kernels.get(case.kernel)
        if kernel is None:
            kernel = self.kernels[case.kernel] = self.module.kernel(case.kernel)
        config = LaunchConfig.make(case.grid, case.block, case.shared_mem)
        args = [np.uint64(t.data_ptr()) if isinstance(t, torch.Tensor) else t for t in tensors]
        blobs = [(ctypes.c_char * len(data)).from_buffer_copy(data) for data in (pack_one(i, a).data for i, a in enumerate(args))]
        params = (ctypes.c_void_p * len(blobs))(*(ctypes.addressof(b) for b in blobs))
        torch.cuda.synchronize()
        kernel.launch(config.grid, config.block, config.shared_mem, torch.cuda.current_stream().cuda_stream,
                      ctypes.addressof(params))
        torch.cuda.synchronize()

    def run(self, case: Case) -> list[np.ndarray]:
        tensors = [self.to_device(a) if isinstance(a, np.ndarray) else a for a in case.args]
        self.launch(case, tensors)
        return [tensors[i].cpu().numpy().copy() for i in case.outputs]


# ------------------------------------------------------------------------ comparisons


def assert_equal_bits(got: np.ndarray, want: np.ndarray, what: str, seed=None) -> None:
    """Bitwise equality of two arrays of the same dtype; names the first differing index."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g = np.ascontiguousarray(got).view(np.uint8).reshape(got.shape + (-1,)) if got.ndim else got
    w = np.ascontiguousarray(want).view(np.uint8).reshape(want.shape + (-1,)) if want.ndim else want
    bad = (g != w).any(axis=-1) if got.ndim else (g != w)
    if np.any(bad):
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements differ bitwise; first at {idx}: "
            f"got {got[idx]!r}, want {want[idx]!r} (shape {got.shape}, seed {seed})")


def assert_close_f64(got: np.ndarray, want: np.ndarray, tol: np.ndarray | float, what: str, seed=None) -> None:
    """|got - want| <= tol elementwise (NaN never passes); names the worst coordinate."""
    err = np.abs(got.astype(np.float64) - want)
    excess = np.where(np.isnan(err), np.inf, err - tol)
    if np.any(excess > 0):
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(excess)), excess.shape))
        t = tol[idx] if isinstance(tol, np.ndarray) else tol
        raise AssertionError(
            f"{what}: worst at {idx}: got {got[idx]!r}, want {want[idx]!r}, |err| {err[idx]:.3g} > tol {t:.3g} "
            f"({int((excess > 0).sum())} of {got.size} out of tolerance; shape {got.shape}, seed {seed})")


# ------------------------------------------------------------- float formats (models)


def bf16_bits(values) -> np.ndarray:
    """uint16 bit patterns of bf16(values) (round to nearest even, via PyTorch)."""
    return torch.tensor(np.asarray(values, np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def f16_bits(values) -> np.ndarray:
    return np.asarray(values, np.float32).astype(np.float16).view(np.uint16)


def fp8_bits(values, fmt: str) -> np.ndarray:
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    return torch.tensor(np.asarray(values, np.float32)).to(dt).view(torch.uint8).numpy()


def decode_bits(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Exact float64 values of bf16/f16/e4m3/e5m2 bit patterns (the ISA's formats:
    IEEE binary16, bfloat16 = top half of binary32, OCP FP8 E4M3 (no inf) / E5M2)."""
    if fmt == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if fmt == "f16":
        return bits.view(np.float16).astype(np.float64)
    return decode_fp8(bits, fmt)


def decode_fp8(bits: np.ndarray, fmt: str) -> np.ndarray:
    """Bit-field decode written from the format definition (not through PyTorch)."""
    b = bits.astype(np.int64)
    ebits, mbits, bias = (4, 3, 7) if fmt == "e4m3" else (5, 2, 15)
    sign = np.where(b >> 7 & 1, -1.0, 1.0)
    e = (b >> mbits) & ((1 << ebits) - 1)
    m = b & ((1 << mbits) - 1)
    mag = np.where(e == 0, m * 2.0 ** (1 - bias - mbits), (1 + m / 2.0**mbits) * 2.0 ** (e - bias))
    if fmt == "e4m3":
        mag = np.where((e == 15) & (m == 7), np.nan, mag)
    else:
        mag = np.where(e == 31, np.where(m == 0, np.inf, np.nan), mag)
    return sign * mag


def exact_values(rng: np.random.Generator, shape, fmt: str) -> np.ndarray:
    """Small integers in [-7, 7] times 2^[-2, 2]: representable in every input format
    (e5m2 has 2 mantissa bits: 7 = 1.11b x 4), and every mma partial sum over K <= 64 is a
    multiple of 2^-4 below 2^16, hence exact in fp32 whatever the summation order."""
    del fmt
    return rng.integers(-7, 8, size=shape).astype(np.float64) * 2.0 ** rng.integers(-2, 3, size=shape)


def encode(values: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "bf16":
        return bf16_bits(values)
    if fmt == "f16":
        return f16_bits(values)
    return fp8_bits(values, fmt)


# ------------------------------------------------------------------ tests of the models


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decoder_matches_torch(fmt):
    bits = np.arange(256, dtype=np.uint8)
    dt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    want = torch.from_numpy(bits.copy()).view(dt).double().numpy()
    got = decode_fp8(bits, fmt)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), f"{fmt}: NaN patterns differ"
    assert np.array_equal(got[~nan], want[~nan]), f"{fmt}: decoded values differ"


@pytest.mark.parametrize("fmt", ["bf16", "f16", "e4m3", "e5m2"])
def test_exact_values_are_representable(fmt):
    rng = np.random.default_rng(0)
    v = exact_values(rng, (4096,), fmt)
    assert np.array_equal(decode_bits(encode(v, fmt), fmt), v), f"{fmt}: exact_values() not exact"
