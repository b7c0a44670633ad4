"""ptx/ldmatrix.cuh: ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 on the
simulator against a bitwise numpy model of PTX ISA "ldmatrix".

Model: lanes 8j..8j+7 give the addresses of rows 0..7 of matrix j; lane l receives, per
matrix j, one .b32 holding M_j[l/4][2(l%4)] (low half) and M_j[l/4][2(l%4)+1] (high half),
or with .trans M_j[2(l%4)][l/4] and M_j[2(l%4)+1][l/4]. The kernel stores the rows in
shared memory in a permuted order with padding, so only the per-lane addresses say where
a row is; lanes whose address the shape ignores point at wrong rows on purpose.

The kernels, models and case builders: tests/ptx_cases/ldmatrix.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.case import Case, poisoned
from ptx_cases.ldmatrix import SHAPES, SOURCE, ldmatrix_case
from ptx_cases.runners import SimRunner


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


@pytest.mark.parametrize("n,trans", SHAPES)
def test_ldmatrix_structured(runner, n, trans):
    case = ldmatrix_case(n, trans, 0, structured=True)
    case.check(runner.run(case))


@pytest.mark.parametrize("n,trans", SHAPES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ldmatrix_random_permuted_rows(runner, n, trans, seed):
    case = ldmatrix_case(n, trans, seed)
    case.check(runner.run(case))


def test_ldmatrix_misaligned_row_fails(runner):
    from fastmoe_ops.errors import SimError

    case = ldmatrix_case(4, False, 0)
    case.args[3] = np.int32(2)  # rows at +2 bytes: not 16-byte aligned
    with pytest.raises(SimError, match="aligned"):
        runner.run(case)


def test_ldmatrix_global_address_fails(runner):
    from fastmoe_ops.errors import SimError

    src = np.zeros(64, np.uint16)
    case = Case(name="ldmatrix global", kernel="ldm_global_address", grid=(1,), block=(32,),
                args=[src, poisoned((32,), np.uint32)], outputs=[1], check=None)
    with pytest.raises(SimError, match="shared memory"):
        runner.run(case)
