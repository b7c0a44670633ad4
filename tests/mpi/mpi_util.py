"""Helpers for multi-rank tests."""
from __future__ import annotations

import pytest


def need_ranks(comm, n: int) -> None:
    if comm.Get_size() < n:
        pytest.skip(f"needs at least {n} MPI ranks, world has {comm.Get_size()} (run under mpirun -n {n})")


def all_agree(comm, ok: bool, detail: str) -> None:
    """Gather every rank's outcome, then assert on all ranks alike (no rank left waiting)."""
    outcomes = comm.allgather((ok, detail))
    failures = [f"rank {r}: {d}" for r, (o, d) in enumerate(outcomes) if not o]
    assert not failures, "\n".join(failures)
