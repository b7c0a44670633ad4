"""bench/bench_moe_kernels.py (the `moe` area of `python -m bench`) at tiny shapes: every row is
produced with finite statistics and exact byte counts, and a kernel that disagrees with the
reference is refused before any timing (benchmarks print; this checks the rows' plumbing)."""
from __future__ import annotations

import math

import pytest
import torch

import fastmoe_ops as fmo
from bench import bench_moe_kernels as bmk
from bench import stats
from fastmoe_ops.ops import moe_layout, moe_permute
from fastmoe_ops.ops.fp8_gemm import contiguous_alignment

N, H, E, K = 48, 64, 4, 2           # received rows, hidden, local experts, top-k
LAYOUT = (40, 4, 16, 4, True)       # tokens, top-k, experts, buckets, once
COPY_GBPS = 100.0                   # a stand-in ceiling: the "% ceil" plumbing, not a measurement
CPU = torch.device("cpu")


@pytest.fixture
def tiny(monkeypatch):
    """The module's CPU shapes made tiny and each comparison short."""
    monkeypatch.setattr(bmk, "PERMUTE_CPU_SHAPES", [(N, H, E, K)])
    monkeypatch.setattr(bmk, "LAYOUT_CPU_SHAPES", [LAYOUT, LAYOUT[:3] + (LAYOUT[2], False)])
    monkeypatch.setattr(bmk, "compare", lambda ours, base, **kw: stats.compare(ours, base, **{**kw, "max_seconds": 0.3}))


def expected_bytes() -> dict:
    """Bytes each kernel row must count, from the routing alone: every valid (row, slot) pair is
    one row read; the gather writes one row per sorted row (each expert's pairs padded to the
    grouped GEMM's alignment) plus its int64 index, the reduce one row per received row plus
    int64 index + fp32 weight per slot."""
    _, idx, _ = bmk.routed_rows(CPU, N, H, E, K)
    pairs = int((idx >= 0).sum())
    per_expert = torch.bincount(idx[idx >= 0], minlength=E)
    a = contiguous_alignment()
    m = int(sum(-(-int(c) // a) * a for c in per_expert))
    row = 2 * H
    return {"moe_gather_rows": pairs * row + m * row + m * 8, "moe_gather_reduce": pairs * row + N * row + N * K * 12,
            "moe_permute_unpermute": 2 * (N * row + pairs * row)}


@pytest.mark.parametrize("engine", ["reference", "sim"])
def test_rows_are_produced_with_finite_ratios(tiny, engine):
    if engine not in fmo.available_backends():
        pytest.skip(f"engine {engine} not available")
    rows = bmk.run(CPU, engine, quick=False, copy_gbps=COPY_GBPS)
    ops = [r.op for r in rows]
    assert ops == ["moe_permute_unpermute", "moe_gather_rows", "moe_gather_reduce", "moe_layout", "moe_layout"], ops
    for r in rows:
        assert r.engine == engine and r.ours_s > 0 and r.baseline_s > 0, r
        ratios = (r.speedup, r.stats["ratio_lo"], r.stats["ratio_hi"])
        assert all(math.isfinite(x) and x > 0 for x in ratios) and r.stats["pairs"] >= stats.MIN_PAIRS, r
        assert r.ceiling == "device copy" and math.isfinite(r.pct_of_ceiling) and r.pct_of_ceiling > 0, r
    for op, moved in expected_bytes().items():
        assert next(r for r in rows if r.op == op).bytes_moved == moved, op
    t, k, _, b, _ = LAYOUT
    assert [r.bytes_moved for r in rows if r.op == "moe_layout"] == [t * k * 8 + (b + t * b) * 8, t * k * 8 + (16 + t * k) * 8]
    assert [r.shape.split()[-1] for r in rows if r.op == "moe_layout"] == ["once", "per-slot"]


def _skip_last_row(launcher):
    """launcher run for real, then its last output row set to 7: a kernel that gets one row wrong."""
    def wrong(*args, out, **kw):
        launcher(*args, out=out, **kw)
        (out if isinstance(out, tuple) else (out,))[-1][-1] = 7
        return out
    return wrong


def _write_nothing(launcher):
    """A kernel that writes nothing: only the row's poisoning of `out` can tell (torch.empty may
    hand back memory that held the reference's answer)."""
    return lambda *args, out, **kw: out


@pytest.mark.parametrize("row, module, name", [
    (lambda: bmk.gather_rows_row(CPU, (N, H, E, K), engine="sim", max_seconds=0.1, copy_gbps=0.0), moe_permute, "gather_rows"),
    (lambda: bmk.gather_reduce_row(CPU, (N, H, E, K), engine="sim", max_seconds=0.1, copy_gbps=0.0), moe_permute,
     "gather_reduce"),
    (lambda: bmk.layout_row(CPU, LAYOUT, engine="sim", max_seconds=0.1, copy_gbps=0.0), moe_layout, "bucket_layout"),
], ids=["gather_rows", "gather_reduce", "layout"])
@pytest.mark.parametrize("fault", [_skip_last_row, _write_nothing])
def test_a_wrong_kernel_is_never_timed(monkeypatch, row, module, name, fault):
    if "sim" not in fmo.available_backends():
        pytest.skip("engine sim not available")
    monkeypatch.setattr(module, name, fault(getattr(module, name)))
    monkeypatch.setattr(bmk, "compare", lambda *a, **kw: pytest.fail("timed a wrong kernel"))
    with pytest.raises(RuntimeError, match="disagrees with the reference .*not timing it"):
        row()


@pytest.mark.parametrize("once", [True, False])
def test_torch_layout_baseline_is_the_reference_layout(once):
    """The baseline computes the same layout (the rows check it too; here over more seeds, with
    tokens whose slots repeat a bucket and slots routed elsewhere)."""
    from fastmoe_ops.reference import moe as ref

    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(-1, 32, (37, 6), generator=g)
        buckets, per = (4, 8) if once else (32, 1)
        got, want = bmk.torch_layout(idx, buckets, per, once), ref.bucket_layout(idx, buckets, per, once)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed} once={once}"
