"""ptx/cp_async.cuh: cp.async.{ca,cg}.shared.global with src-size zero-fill, commit_group,
wait_group N and wait_all, on the simulator against a bitwise model (PTX ISA
"cp.async"): destination bytes [0, src-size) are the source's, [src-size, cp-size) zero.

After the retiring wait and a barrier, every thread reads another thread's chunk, so the
copies must be visible CTA-wide. A kernel that omits the wait must read the simulator's
poison (0xFF bytes, NaN as f32): on a GPU that read is a race, so that case is sim-only.

The kernels, models and case builders: tests/ptx_cases/cp_async.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.case import Case
from ptx_cases.cp_async import SOURCE, THREADS, VARIANTS, copy_case, groups_case
from ptx_cases.runners import SimRunner


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


@pytest.mark.parametrize("kind,size", VARIANTS)
@pytest.mark.parametrize("wait_all", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_cp_async_zero_fill(runner, kind, size, wait_all, seed):
    case = copy_case(kind, size, seed, wait_all=wait_all)
    case.check(runner.run(case))


@pytest.mark.parametrize("kind,size", VARIANTS)
def test_cp_async_full_copy(runner, kind, size):
    case = copy_case(kind, size, 7, full=True)
    case.check(runner.run(case))


def test_cp_async_wait_group_retires_oldest_groups(runner):
    case = groups_case(3)
    out, early = runner.run(case)
    case.check([out])
    # group 2 was still in flight at wait_group 1: its region must still be poison
    assert np.all(early == 0xFF), f"region of an unretired group read {early[early != 0xFF][:8]} instead of poison"


def test_cp_async_missing_wait_reads_poison(runner):
    rng = np.random.default_rng(4)
    src = rng.standard_normal(THREADS * 4).astype(np.float32)
    case = Case(name="cp.async without wait", kernel="cpa_missing_wait", grid=(1,), block=(THREADS,),
                args=[src, np.zeros(THREADS * 4, np.float32)], outputs=[1], check=None, shared_mem=THREADS * 16)
    (out,) = runner.run(case)
    assert np.all(np.isnan(out)), (
        f"reading shared memory before cp.async.wait_* returned data ({np.count_nonzero(~np.isnan(out))} of "
        f"{out.size} not NaN): the simulator must expose the missing wait")


@pytest.mark.parametrize("bad", ["src_bytes", "misaligned"])
def test_cp_async_invalid_operands_fail(runner, bad):
    from fastmoe_ops.errors import SimError

    case = copy_case("ca", 8, 0, full=True)
    if bad == "src_bytes":
        case.args[1] = np.full(THREADS, 9, np.uint32)  # src-size > cp-size
        match = "src-size"
    else:
        case.args[0] = np.zeros(THREADS * 8 + 4, np.uint8)
        case.kernel = "cpa_ca8"
        match = "aligned"
    with pytest.raises(SimError, match=match):
        if bad == "misaligned":
            import torch

            tensors = [torch.from_numpy(case.args[0])[4:], torch.from_numpy(case.args[1].copy()),
                       torch.from_numpy(case.args[2].copy()), case.args[3]]
            runner.launch(case, tensors)
        else:
            runner.run(case)
