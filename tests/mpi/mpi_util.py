"""Helpers for multi-rank tests (and tests/gpu/test_moe_gpu.py, which runs under mpirun too):
the `comm` fixture, outcomes gathered before asserting, every rank's MoE inputs from
(seed + rank), bitwise comparison.

Run as `mpirun -n 4 python -m pytest tests/mpi` (run.sh does, under a timeout). Each rank runs
every test; a test gathers its outcome before asserting, so a rank that fails cannot leave
the others waiting in a collective. Without mpi4py every test file importing this module is
skipped. The fixture lives here, not in a tests/mpi/conftest.py: a second conftest module
would shadow tests/conftest.py (`from conftest import ...`) in any run that collects tests/mpi
with other folders, as the GPU check's multi-rank step does."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py not installed")


@pytest.fixture
def comm():
    """MPI.COMM_WORLD (import this fixture into a test file to use it)."""
    return MPI.COMM_WORLD


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


def expect_same_error(comm, fn, error_type, fragment):
    """Every rank raises error_type with one identical message containing fragment."""
    try:
        fn()
        msg, ok = "no error", False
    except error_type as e:
        msg, ok = str(e), fragment in str(e)
    except Exception as e:
        msg, ok = f"{type(e).__name__}: {e}", False
    messages = comm.allgather(msg)
    all_agree(comm, ok and len(set(messages)) == 1, f"{msg!r} (all: {set(messages)})")


def experts_for(world: int, k: int) -> int:
    """The fewest experts, a multiple of the world size, that give every rank at least two
    and let a token pick k distinct ones."""
    return world * max(2, -(-k // world))


def inputs(world, seed, tokens, k, experts, hidden, dtype, *, structured=False, skew=False, minus_one=0.0):
    """Every rank's (x, topk_idx, topk_weights). tokens: one count per rank. Each token picks
    k distinct experts (then minus_one of the slots are set to -1), so k <= experts."""
    if not skew and k > experts:
        raise ValueError(f"inputs: k={k} distinct experts per token, but only {experts} experts (see experts_for)")
    xs, idxs, ws = [], [], []
    for s in range(world):
        g = torch.Generator().manual_seed(seed + s)
        t = tokens[s]
        if structured:   # x = rank*1000 + token (+ column/1024 so a column shift shows too)
            x = (s * 1000 + torch.arange(t, dtype=torch.float64)[:, None] + torch.arange(hidden) / 1024).to(dtype)
        else:
            x = torch.randn(t, hidden, generator=g, dtype=torch.float64).to(dtype)
        if skew:
            idx = torch.zeros(t, k, dtype=torch.int64)
            idx[:, 1:] = -1
        else:
            idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
        if minus_one:
            idx[torch.rand(idx.shape, generator=g) < minus_one] = -1
        w = torch.rand(t, k, generator=g, dtype=torch.float32)
        xs.append(x), idxs.append(idx), ws.append(w)
    return xs, idxs, ws


def bitwise(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel():
        bad = (a.contiguous().view(torch.uint8).reshape(a.shape[0], -1) != b.contiguous().view(torch.uint8).reshape(b.shape[0], -1)).any(1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise AssertionError(f"{what}: {int(bad.sum())} of {a.shape[0]} rows differ; first row {i}: got {a[i][:6].tolist()}, want {b[i][:6].tolist()}")


def buffer_inputs_on_device(monkeypatch, tags) -> None:
    """From now on, every tensor handed to a Buffer's dispatch or combine is a device tensor
    for `tags` (tests/device_tags.py); a tagged view, so the caller's own tensor (and the
    oracle computed from it) stays a host one."""
    def on_device(t):
        return tags.mark(t.view_as(t)) if isinstance(t, torch.Tensor) else t

    for name in ("dispatch", "combine"):
        def call(buf, x, *rest, _real=getattr(fmo.moe.Buffer, name)):
            return _real(buf, tuple(map(on_device, x)) if isinstance(x, tuple) else on_device(x), *map(on_device, rest))
        monkeypatch.setattr(fmo.moe.Buffer, name, call)
