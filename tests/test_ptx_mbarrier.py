"""ptx/mbarrier.cuh (and ptx/warp.cuh's elect_one_sync, ldmatrix.cuh's stmatrix) on the simulator: the phase/parity
rule of the PTX ISA ("mbarrier": try_wait.parity p succeeds once the phase of parity p has
completed; a fresh barrier's parity-1 phase counts as completed), and each misuse failing
with its message: waiting two phases away after too many arrivals, a barrier never
initialised, and a deadlock naming the barrier. TMA transaction misuse (expect_tx mismatches,
reading before the wait, arrivals beyond the count) is in tests/test_ptx_tma.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ptx_cases.case import poisoned
from ptx_cases.runners import SimRunner
from ptx_cases.tma import SOURCE, cases, elect_case, stmatrix_case

@pytest.fixture(scope="module")
def runner():
    return SimRunner(SOURCE)


def _misuse(runner, mode: int, threads: int = 32) -> np.ndarray:
    out = torch.from_numpy(poisoned((threads,), np.int32))
    runner.module.get_function("mbar_misuse")((1, 1, 1), (threads, 1, 1), (np.int32(mode), out))
    return out.numpy()


def test_two_phase_handshake_and_fresh_parity(runner):
    """32 arrivals per phase, two phases waited with parity 0 then 1; then parity 1 reads as
    completed (phase 1 done)."""
    assert (_misuse(runner, 3) == 7).all()


def test_too_many_arrivals_waiter_two_phases_away(runner):
    with pytest.raises(Exception, match=r"mbarrier #0 at 0x[0-9a-f]+: this thread waits on parity 0 meaning phase 0, but phases up to [1-9][0-9]* "
                                        r"have completed: two or more phases away"):
        _misuse(runner, 0)


def test_uninitialised_barrier(runner):
    with pytest.raises(Exception, match="was never initialised"):
        _misuse(runner, 1)


def test_deadlock_names_the_barrier(runner):
    """Count 32, nobody arrives, every thread waits: reported at once (not the launch timeout)."""
    with pytest.raises(Exception, match=r"deadlock: all threads of the CTA wait on mbarriers and nothing changes; "
                                        r"this thread waits on mbarrier #0 at 0x[0-9a-f]+ parity 0: phase 0 has 32 "
                                        r"of 32 arrivals missing"):
        _misuse(runner, 2, threads=64)


@pytest.mark.parametrize("threads", [32, 64, 96])
def test_elect_one_sync(runner, threads):
    case = elect_case(threads)
    case.check(runner.run(case))


@pytest.mark.parametrize("trans", [False, True])
def test_stmatrix_x4(runner, trans):
    """stmatrix.x4{,.trans} against the ISA's fragment layout (ptx_cases/tma.py: stmatrix_case)."""
    case = stmatrix_case(77 + trans, trans)
    case.check(runner.run(case))


def test_family_cases_pass_on_the_simulator(runner):
    """Every GPU conformance case of the family passes its model check on the simulator."""
    for case in cases(1234):
        case.check(runner.run(case))
