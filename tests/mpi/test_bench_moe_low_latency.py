"""bench.bench_moe's moe_low_latency row across real MPI ranks (the `sim` engine over shared
memory): the row comes out with finite times and ratio interval, and its correctness check
(run before any timing) refuses a wrong combine on every rank instead of timing it.
~20 s at -n 2 (the simulator compiles each kernel variant once)."""
from __future__ import annotations

import math

import pytest
import torch

import fastmoe_ops as fmo
from bench import bench_moe

from mpi_util import comm, need_ranks, run_all  # noqa: F401 (comm: a fixture)

pytestmark = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="the ipc transport runs on the sim engine here")

TINY = dict(tokens=4, hidden=128, k=2)


def tiny_row(comm, payload="bf16"):
    need_ranks(comm, 2)
    return bench_moe.run_low_latency(comm, torch.device("cpu"), TINY["tokens"], TINY["hidden"], 4 * comm.Get_size(),
                                     TINY["k"], payload, max_seconds=0.5)


@pytest.mark.parametrize("payload", ["bf16", "bf16->fp8"])
def test_row_is_produced_with_finite_statistics(comm, payload):
    row = tiny_row(comm, payload)

    def check():
        assert row.op == "moe_low_latency" and row.engine == "sim" and f"R{comm.Get_size()}" in row.shape, row
        values = [row.ours_s, row.baseline_s, row.stats["ratio"], row.stats["ratio_lo"], row.stats["ratio_hi"]]
        assert all(math.isfinite(v) and v > 0 for v in values), row.stats
        assert row.stats["ratio_lo"] <= row.stats["ratio"] <= row.stats["ratio_hi"], row.stats
        # every rank sent T*k rows each way: bf16 out and back, or e4m3 + one fp32 scale out
        row_in = 2 * TINY["hidden"] if payload == "bf16" else TINY["hidden"] + 4
        assert row.bytes_moved == comm.Get_size() * TINY["tokens"] * TINY["k"] * (row_in + 2 * TINY["hidden"])
        return "ok"

    run_all(comm, check)


@pytest.mark.parametrize("path", ["low_latency_combine", "combine"])
def test_a_wrong_combine_raises_before_timing(comm, monkeypatch, path):
    """One element off by a little more than the bound on the last rank only: every rank raises
    (the check is collective) and nothing is timed."""
    need_ranks(comm, 2)
    real = getattr(fmo.moe.Buffer, path)
    last = comm.Get_rank() == comm.Get_size() - 1

    def wrong(self, *args, **kw):
        out = real(self, *args, **kw)
        if last:
            out[1, 3] = out[1, 3].float() * 1.05 + 0.05
        return out

    monkeypatch.setattr(fmo.moe.Buffer, path, wrong)
    monkeypatch.setattr(bench_moe, "compare_across_ranks", lambda *a, **kw: pytest.fail("timed a wrong result"))
    with pytest.raises(RuntimeError, match=f"rank {comm.Get_size() - 1}: {path} "):
        tiny_row(comm)
