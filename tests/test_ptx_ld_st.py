"""ptx/ld_st.cuh: cached / non-coherent loads and stores (bitwise), ld.acquire / st.release
message passing at every scope, and red / atom against numpy models of PTX ISA
"atom" / "red" (atom returns the old value; the set of old values of n unit increments of one
counter is 0..n-1 in some order; integer adds wrap; .add.f32 flushes subnormal inputs and
results to sign-preserving zero, which the GPU's SASS, ATOM.E.ADD.F32.FTZ.RN, confirms).

The kernels, models and case builders: tests/ptx_cases/ld_st.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.ld_st import MODES, SCOPES, SIZES, SOURCE, bits_case, copy_case, counts_case, ftz_case, lock_case, message_case
from ptx_cases.runners import SimRunner


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode", list(MODES))
def test_loads_and_stores_bitwise(runner, size, mode):
    case = copy_case(size, mode, size + mode)
    case.check(runner.run(case))


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("bits", [32, 64])
def test_release_acquire_message_passing(runner, scope, bits):
    case = message_case(scope, bits)
    case.check(runner.run(case))


def test_atomic_and_reduction_adds(runner):
    case = counts_case()
    case.check(runner.run(case))


@pytest.mark.parametrize("seed", [0, 1])
def test_atomic_bitwise_exchange_cas(runner, seed):
    case = bits_case(seed)
    case.check(runner.run(case))


def test_cas_spin_lock(runner):
    case = lock_case()
    case.check(runner.run(case))


def test_f32_atomics_flush_subnormals(runner):
    case = ftz_case()
    case.check(runner.run(case))


def test_misaligned_vector_load_fails(runner):
    import torch

    from fastmoe_ops.errors import SimError

    case = copy_case(16, 0, 0)
    buf = torch.zeros(1000 * 4 + 1, dtype=torch.int32)
    tensors = [buf[1:], torch.zeros(1000 * 4 + 1, dtype=torch.int32)[1:], np.int32(1000), np.int32(0)]
    with pytest.raises(SimError, match="aligned"):
        runner.launch(case, tensors)
