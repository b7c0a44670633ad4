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


def run_all(comm, fn) -> None:
    """Run fn on every rank, then gather the outcomes before asserting, so a failure on one
    rank is reported on all of them (with its traceback) and no rank is left waiting."""
    try:
        detail, ok = fn(), True
    except Exception as e:  # noqa: BLE001 - reported on every rank by all_agree
        import traceback

        ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
    all_agree(comm, ok, str(detail))
