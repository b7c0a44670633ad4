"""Kernel trace (FMO_TRACE=1): records of real simulator launches, the interval analysis on
hand-built traces, overflow, the timeline plot, and two kernels on a "comm" and a "compute"
stream in flight together according to the trace. The CUDA case:
tests/gpu/test_trace_gpu.py."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import fastmoe_ops as fmo
import fastmoe_ops.streams as fs
import fastmoe_ops.trace as ft
from fastmoe_ops import env
from fastmoe_ops.errors import InputError
from fastmoe_ops.ops import fp8_quant
from fastmoe_ops.reference import fp8 as reference
from fastmoe_ops.trace import Interval

from conftest import assert_bitwise_equal

needs_sim = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
TIMEOUT_S = 60.0  # rendezvous bound: generous for a loaded 2-core machine; a hang fails, not blocks


def iv(role, start, end, name="k"):
    return Interval(name, role, "sim", start, end, 0, 1)


# ------------------------------------------------------------------------- stub and key


def test_trace_is_codegen_and_untraced_stub_has_no_trace():
    assert "FMO_TRACE" in env.CODEGEN_VARIABLES  # part of every cache key
    spec = fp8_quant.Fp8GroupQuantSpec(dtype="bf16", group_size=128, vec_width=8, pow2_scale=False)
    plain, traced = spec.stub(False), spec.stub(True)
    assert "trace" not in plain
    assert "fmo::trace::Args fmo_trace" in traced and "fmo::trace::end(fmo_trace)" in traced
    assert spec.entry_name() in plain and spec.entry_name() in traced


# ---------------------------------------------------------------------- real launches


@needs_sim
def test_sim_kernel_records_one_interval_per_cta(tracing):
    seed = 7
    x = torch.randn(70, 384, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
    plan_spec = fp8_quant.choose_spec(x, 128, False)
    m, groups = 70, 3
    grid = -(-(m * groups) // (fp8_quant.BLOCK_THREADS // plan_spec.team()))
    stream = fs.Stream("cpu", role="compute")
    t_before = time.monotonic_ns()
    with fmo.use_backend("sim"):
        xq, xs = stream.submit(fp8_quant.quantize_per_token_group, x).result()
    t_after = time.monotonic_ns()
    stream.close()
    ivs = ft.collect()
    # tracing must not change what the kernel computes
    rq, rs = reference.quantize_per_token_group(x, 128)
    assert_bitwise_equal(xs, rs, "scales (traced)", seed)
    assert_bitwise_equal(xq, rq, "values (traced)", seed)
    assert sorted(i.cta for i in ivs) == list(range(grid)), f"one record per CTA of a {grid}-CTA grid"
    assert {i.name for i in ivs} == {plan_spec.entry_name()}
    assert {(i.role, i.engine) for i in ivs} == {("compute", "sim")}
    assert len({i.launch_id for i in ivs}) == 1
    for i in ivs:
        # the simulator's %globaltimer is time.monotonic_ns's clock: stamps fall inside the call
        assert t_before <= i.start_ns <= i.end_ns <= t_after, i
        assert i.sm > 0


@needs_sim
def test_untraced_launch_records_nothing(monkeypatch):
    monkeypatch.delenv("FMO_TRACE", raising=False)
    ft.clear()
    with fmo.use_backend("sim"):
        fp8_quant.quantize_per_token_group(torch.ones(4, 128, dtype=torch.float32))
    assert ft.collect() == []


@needs_sim
def test_overflow_is_reported_not_truncated(tracing, monkeypatch):
    monkeypatch.setenv("FMO_TRACE_CAPACITY", "4")
    ft.clear()  # the next buffer gets the new capacity
    x = torch.ones(64, 512, dtype=torch.bfloat16)  # 256 groups: 16 CTAs of 16 groups
    with fmo.use_backend("sim"):
        fp8_quant.quantize_per_token_group(x)
    with pytest.raises(ft.TraceOverflowError, match=r"32 events \(2 per CTA\) for 4 slots.*FMO_TRACE_CAPACITY"):
        ft.collect()
    monkeypatch.setenv("FMO_TRACE_CAPACITY", "32")
    ft.clear()
    with fmo.use_backend("sim"):
        fp8_quant.quantize_per_token_group(x)
    assert len(ft.collect()) == 16  # exactly full is not an overflow


@needs_sim
def test_comm_and_compute_kernels_in_flight_together(tracing):
    # Each side of the rendezvous finishes without timing out only if the other side's
    # kernel is running at the same time: the streams' overlap, checked by the kernels
    # themselves, and then by the trace.
    flags = torch.zeros(2, dtype=torch.int32)
    met = torch.zeros(2, dtype=torch.int32)
    comm, compute = fs.Stream("cpu", role="comm"), fs.Stream("cpu", role="compute")
    with fmo.use_backend("sim"):
        pa = comm.submit(ft.rendezvous, flags, met, 0, timeout_s=TIMEOUT_S, engine="sim")
        pb = compute.submit(ft.rendezvous, flags, met, 1, timeout_s=TIMEOUT_S, engine="sim")
        pa.result(), pb.result()
    comm.close(), compute.close()
    assert met.tolist() == [1, 1], f"rendezvous outcome {met.tolist()} (2 = timed out waiting for the other stream)"
    ivs = ft.collect()
    assert {(i.role, i.name) for i in ivs} == {("comm", "fmo_trace_rendezvous"), ("compute", "fmo_trace_rendezvous")}
    assert ft.in_flight_together(ivs, "comm", "compute")
    assert 0.0 < ft.overlapped_fraction(ivs, "comm", "compute") <= 1.0


@needs_sim
def test_rendezvous_alone_times_out(tracing, monkeypatch):
    # The probe can fail: without a partner it reports 2, and under memcheck every write
    # (met, the trace record and counter) lies inside the launch's declared memory.
    monkeypatch.setenv("FMO_SIM_MEMCHECK", "1")
    flags = torch.zeros(2, dtype=torch.int32)
    met = torch.zeros(2, dtype=torch.int32)
    ft.rendezvous(flags, met, 1, timeout_s=0.2, engine="sim")
    assert met.tolist() == [0, 2] and flags.tolist() == [0, 1]
    (one,) = ft.collect()
    assert one.role == "default" and one.end_ns - one.start_ns >= 0.2e9


def test_rendezvous_bad_input():
    ok = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(InputError, match="flags"):
        ft.rendezvous(torch.zeros(2, dtype=torch.int64), ok, 0, timeout_s=1.0, engine="sim")
    with pytest.raises(InputError, match="me"):
        ft.rendezvous(ok, torch.zeros(2, dtype=torch.int32), 2, timeout_s=1.0, engine="sim")
    with pytest.raises(InputError, match="timeout_s"):
        ft.rendezvous(ok, torch.zeros(2, dtype=torch.int32), 0, timeout_s=0.0, engine="sim")


def test_host_interval_labels_role_and_only_when_tracing(tracing, monkeypatch):
    s = fs.Stream("cpu", role="comm")

    def exchange():
        with ft.host_interval("mpi_alltoallv"):
            time.sleep(0.01)

    s.submit(exchange).result()
    s.close()
    (one,) = ft.collect()
    assert (one.name, one.role, one.engine, one.cta) == ("mpi_alltoallv", "comm", "host", -1)
    assert one.end_ns - one.start_ns >= 10_000_000
    monkeypatch.setenv("FMO_TRACE", "0")
    ft.clear()
    with ft.host_interval("ignored"):
        pass
    assert ft.collect() == []


# -------------------------------------------------------------------- interval analysis


def test_by_role_merges_overlapping_and_touching_intervals():
    ivs = [iv("comm", 0, 10), iv("comm", 5, 15), iv("comm", 15, 20), iv("comm", 30, 40), iv("compute", 1, 2)]
    assert ft.by_role(ivs) == {"comm": [(0, 20), (30, 40)], "compute": [(1, 2)]}


@pytest.mark.parametrize("comm, compute, want", [
    ([(0, 10), (20, 30)], [(5, 25)], 10 / 20),
    ([(0, 10)], [(0, 10)], 1.0),
    ([(0, 10)], [(10, 20)], 0.0),                    # touching is not overlapping
    ([(0, 10), (2, 8)], [(8, 9), (9, 12)], 2 / 10),  # comm merges to (0, 10); compute covers (8, 10)
    ([(0, 100)], [(10, 20), (30, 35), (90, 200)], 25 / 100),
])
def test_overlapped_fraction_exact(comm, compute, want):
    ivs = [iv("comm", s, e) for s, e in comm] + [iv("compute", s, e) for s, e in compute]
    assert ft.overlapped_fraction(ivs, "comm", "compute") == want
    assert ft.in_flight_together(ivs, "comm", "compute") == (want > 0)


def test_fraction_needs_both_roles():
    with pytest.raises(InputError, match="'compute'"):
        ft.overlapped_fraction([iv("comm", 0, 10)])
    with pytest.raises(InputError, match="zero total length"):
        ft.overlapped_fraction([iv("comm", 5, 5), iv("compute", 0, 10)])


def test_plot_timeline_writes_a_png_with_both_rows(tmp_path):
    import matplotlib.image

    one = [iv("comm", 0, 4000), iv("comm", 6000, 9000), iv("compute", 2000, 8000)]
    two = [iv("comm", 500, 3000), iv("compute", 0, 9000)]
    for name, trace in (("single", one), ("ranks", [one, two])):
        path = tmp_path / f"{name}.png"
        ft.plot_timeline(trace, path)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        img = matplotlib.image.imread(path)[..., :3]
        # both rows drawn: orange (comm) and blue (compute) pixels are present
        orange = np.all(np.abs(img - np.array([1.0, 0.498, 0.055])) < 0.02, axis=-1).sum()
        blue = np.all(np.abs(img - np.array([0.122, 0.467, 0.706])) < 0.02, axis=-1).sum()
        assert orange > 100 and blue > 100, (orange, blue)


def _events(*rows):
    recs = np.zeros(len(rows), dtype=ft.RECORD_DTYPE)
    for r, (launch_id, cta, kind, t) in zip(recs, rows):
        r["launch_id"], r["cta"], r["kind"], r["time_ns"], r["smid"] = launch_id, cta, kind, t, 9
    return recs


def test_events_pair_into_intervals_and_broken_pairs_are_errors():
    launches = {1: ("k1", "comm", "sim"), 2: ("k2", "compute", "sim")}
    # interleaved events of two launches, CTA ends out of order
    ivs = ft._pair(_events((1, 0, 1, 10), (2, 0, 1, 12), (1, 1, 1, 13), (1, 1, 2, 20), (2, 0, 2, 25), (1, 0, 2, 30)),
                   launches, "cpu")
    got = sorted((i.name, i.role, i.cta, i.start_ns, i.end_ns, i.sm) for i in ivs)
    assert got == [("k1", "comm", 0, 10, 30, 9), ("k1", "comm", 1, 13, 20, 9), ("k2", "compute", 0, 12, 25, 9)]
    with pytest.raises(fmo.FmoError, match="never ended"):
        ft._pair(_events((1, 0, 1, 10)), launches, "cpu")
    with pytest.raises(fmo.FmoError, match="without an earlier start"):
        ft._pair(_events((1, 0, 2, 10)), launches, "cpu")
    with pytest.raises(fmo.FmoError, match="started twice"):
        ft._pair(_events((1, 0, 1, 10), (1, 0, 1, 11)), launches, "cpu")
    with pytest.raises(fmo.FmoError, match="corrupt"):
        ft._pair(_events((0, 0, 0, 0)), launches, "cpu")  # an unwritten (zero) slot


@needs_sim
def test_clock_probe_finds_the_simulator_on_the_host_clock(tracing):
    # In the simulator %globaltimer is time.monotonic_ns's clock: the measured offset must be
    # zero to within the probe's own uncertainty. The probe itself is never traced.
    offset, uncertainty = ft.clock_offset("sim", "cpu")
    assert uncertainty > 0 and abs(offset) <= uncertainty, (offset, uncertainty)
    assert ft.collect() == []
    assert ft.ClockSpec().stub(True) == ft.ClockSpec().stub(False)  # no trace parameter even when asked
