"""Multi-rank tests: run as `mpirun -n 4 python -m pytest tests/mpi` (run.sh does, under a
timeout). Each rank runs every test; a test gathers its outcome before asserting, so a rank
that fails cannot leave the others waiting in a collective."""
from __future__ import annotations

import pytest

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py not installed")


@pytest.fixture
def comm():
    return MPI.COMM_WORLD

