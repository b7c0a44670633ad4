"""ptx/mma.cuh: mma.sync m16n8k16 (bf16, f16) and m16n8k32 (e4m3, e5m2), f32 accumulate,
on the simulator against a float64 model D = A @ B + C.

Two kinds of kernels feed the wrappers: one builds the fragments from global memory with
the ISA's fragment maps (PTX ISA "Matrix Fragments for mma.m16n8k16 / m16n8k32"), the other loads them
with ldmatrix from shared memory (a layout specified separately, in PTX ISA "ldmatrix"), so a
misread fragment map cannot pass both. Inputs are exactly representable small integers
times powers of two (every partial sum exact in fp32: results must match bit for bit),
then random normal data, checked bit for bit against the numpy model of sm_90's arithmetic
(fastmoe_ops/reference/tensor_core.py: HMMA's fused 25-bit step; fp8 as ptxas lowers it, two
f16 HMMA steps and an fp32 add) and with the bound of sequential fp32 accumulation.

The kernels, models and case builders: tests/ptx_cases/mma.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.case import Case, poisoned
from ptx_cases.formats import encode
from ptx_cases.mma import FORMATS, SOURCE, fp8_all_codes_case, mma_case, mma_ldmatrix_case
from ptx_cases.runners import SimRunner


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mma_structured(runner, fmt):
    case = mma_case(fmt, 0, structured=True)
    case.check(runner.run(case))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ksteps", [1, 2, 4])
@pytest.mark.parametrize("seed", [1, 2])
def test_mma_exact_inputs_bit_exact(runner, fmt, ksteps, seed):
    case = mma_case(fmt, seed, ksteps=ksteps)
    case.check(runner.run(case))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", [3, 4])
def test_mma_random_inputs_within_fp32_accumulation_bound(runner, fmt, seed):
    case = mma_case(fmt, seed, ksteps=2, exact=False)
    case.check(runner.run(case))


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_mma_fed_by_ldmatrix(runner, fmt):
    case = mma_ldmatrix_case(fmt, 5)
    case.check(runner.run(case))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("part", [0, 1])
def test_mma_fp8_every_finite_code(runner, fmt, part):
    case = fp8_all_codes_case(fmt, part)
    case.check(runner.run(case))


def test_mma_special_values(runner):
    """Inf and NaN propagate as in IEEE arithmetic: inf * 0 -> NaN in that row; a row with
    one inf product (and no NaN) gives inf."""
    fmt = "bf16"
    av = np.ones((16, 16))
    av[0, 0] = np.inf          # row 0: inf * b[0, n] with b[0, :] = 1 -> inf
    av[1, 3] = np.inf          # row 1: inf * b[3, n] with b[3, :] = 0 -> NaN
    bv = np.ones((16, 8))
    bv[3, :] = 0.0
    a, b = encode(av, fmt), encode(bv, fmt)
    c = np.zeros((16, 8), np.float32)
    case = Case(name="mma specials", kernel="mma_bf16", grid=(1,), block=(32,),
                args=[a, b, c, poisoned((16, 8), np.float32), np.int32(1)], outputs=[3], check=None)
    (d,) = runner.run(case)
    assert np.all(np.isposinf(d[0])), f"row 0 should be +inf, got {d[0]}"
    assert np.all(np.isnan(d[1])), f"row 1 should be NaN, got {d[1]}"
    assert np.all(d[2:] == 15.0), f"rows 2.. should be 15 (16 ones minus the zero row of B), got {d[2:]}"
