"""ptx/barrier.cuh: named barriers (bar.sync / bar.arrive, PTX ISA "bar, barrier") and
fences (fence.acq_rel / fence.sc, PTX ISA "membar / fence") on the simulator.

Models: a producer/consumer pipeline over two named barriers must hand every phase's data
over intact (each consumer reads a producer's value of the same phase, never a stale or a
future one); two groups on separate barrier ids must not wait for each other; a relaxed
flag between two fences must publish the data written before it (the fence-fence
synchronisation of the memory model); fence.sc must forbid the store-buffering outcome.

The kernels, models and case builders: tests/ptx_cases/barrier.py (shared with the GPU
conformance test).
"""
from __future__ import annotations

import numpy as np
import pytest

from ptx_cases.barrier import PHASES, SCOPES, SOURCE, fence_mp_case, fence_sc_case, groups_case, producer_consumer_case
from ptx_cases.case import Case, poisoned
from ptx_cases.runners import SimRunner


@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


@pytest.mark.parametrize("phases", [1, 2, PHASES])
def test_named_barrier_producer_consumer(runner, phases):
    case = producer_consumer_case(phases)
    case.check(runner.run(case))


def test_named_barriers_are_independent(runner):
    case = groups_case()
    case.check(runner.run(case))


def test_named_barrier_state_does_not_leak_between_launches(runner):
    """A launch that leaves a phase half-arrived (consumers' bar.arrive with no producer left)
    is legal; later launches of the same kernel must still work."""
    for phases in (3, 1, 4):
        case = producer_consumer_case(phases)
        case.check(runner.run(case))


@pytest.mark.parametrize("scope", SCOPES)
def test_fence_acq_rel_message_passing(runner, scope):
    case = fence_mp_case(scope)
    case.check(runner.run(case))


def test_fence_sc_forbids_store_buffering(runner):
    case = fence_sc_case()
    case.check(runner.run(case))


@pytest.mark.parametrize("kernel,match", [("bad_count", "multiple of the warp size"),
                                          ("bad_id", "not in 0..15"),
                                          ("mismatched_count", "thread counts")])
def test_named_barrier_invalid_use_fails(runner, kernel, match):
    from fastmoe_ops.errors import SimError

    case = Case(name=kernel, kernel=kernel, grid=(1,), block=(128,), args=[poisoned((128,), np.uint32)],
                outputs=[0], check=None)
    with pytest.raises(SimError, match=match):
        runner.run(case)
