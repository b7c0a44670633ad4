"""The mpi transport's CUDA-aware choice (FMO_MPI_CUDA_AWARE, transports.mpi): one decision
per Buffer, the same on every rank, staging unless every rank chose device buffers; and the
device-buffer path itself, forced on CPU tensors: the packed rows (the kernels' gather
output on the "device", here the CPU) go to MPI as they are and arrive straight in the
outputs, with no pinned staging buffer, bit for bit the staged results."""
from __future__ import annotations

import pytest
import torch

import fastmoe_ops as fmo
from fastmoe_ops.moe import host
from fastmoe_ops.moe.transports import mpi as mpi_transport

import moe_dispatch_util as dispatch_checks
from mpi_util import all_agree, comm, expect_same_error, need_ranks  # noqa: F401 (comm: a fixture)


def decided(comm, setting_of_rank, library_of_rank=lambda r: False, monkeypatch=None) -> bool:
    """Every rank's Buffer decision under per-rank settings and library answers."""
    rank = comm.Get_rank()
    monkeypatch.setenv("FMO_MPI_CUDA_AWARE", setting_of_rank(rank))
    monkeypatch.setattr(mpi_transport, "library_is_cuda_aware", lambda: library_of_rank(rank))
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size())
    try:
        return buf._mpi.device_buffers
    finally:
        buf.destroy()


@pytest.mark.parametrize("setting, library, expected", [
    ("1", False, True), ("0", True, False), ("auto", True, True), ("auto", False, False), (" AUTO ", True, True),
])
def test_setting_decides_alike_on_every_rank(comm, monkeypatch, setting, library, expected):
    got = decided(comm, lambda r: setting, lambda r: library, monkeypatch)
    all_agree(comm, got is expected, f"FMO_MPI_CUDA_AWARE={setting!r}, library {library}: got {got}")


def test_library_without_the_query_is_not_cuda_aware(comm, monkeypatch):
    """mpi4py builds without MPI.Query_cuda_support (this one) answer False, not an error."""
    from mpi4py import MPI

    monkeypatch.delattr(MPI, "Query_cuda_support", raising=False)
    all_agree(comm, mpi_transport.library_is_cuda_aware() is False, "no query: expected False")


def test_ranks_that_disagree_all_stage(comm, monkeypatch):
    """One rank not CUDA-aware (by setting or by its library): staging on every rank."""
    need_ranks(comm, 2)
    last = comm.Get_size() - 1
    by_setting = decided(comm, lambda r: "0" if r == last else "1", monkeypatch=monkeypatch)
    by_library = decided(comm, lambda r: "auto", lambda r: r != 0, monkeypatch)
    all_agree(comm, by_setting is False and by_library is False, f"got {by_setting}, {by_library}")


def test_bad_setting_refused_on_every_rank(comm, monkeypatch):
    need_ranks(comm, 2)
    last = comm.Get_size() - 1
    monkeypatch.setenv("FMO_MPI_CUDA_AWARE", "yes" if comm.Get_rank() == last else "auto")
    expect_same_error(comm, lambda: fmo.moe.Buffer(fmo.comm.Group(comm), hidden=8, num_experts=comm.Get_size()),
                      fmo.InputError, f"FMO_MPI_CUDA_AWARE: expected one of ['auto', '0', '1'], got 'yes' on rank {last}")


@pytest.mark.parametrize("engine", dispatch_checks.ENGINES)
def test_device_buffers_path_bitexact(comm, engine, monkeypatch):
    """The staged path with device buffers, forced on CPU tensors: every dispatch test case,
    FP8 pairs and autograd bit for bit against the oracle; MPI moved the rows (Ialltoallv
    calls) and no pinned staging buffer was ever asked for."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_MPI_CUDA_AWARE", "1")
    monkeypatch.setattr(host, "packed_on_device", lambda t: True)
    seen = {"ialltoallv": 0, "pinned work buffers": 0, "device_buffers": True}
    real_work, real_ialltoallv = host.HostTransport.work, fmo.comm.Group.ialltoallv

    def work(self, name, shape, dtype, pinned=False):
        seen["pinned work buffers"] += pinned
        seen["device_buffers"] &= self.device_buffers
        return real_work(self, name, shape, dtype, pinned)

    def ialltoallv(self, *a, **kw):
        seen["ialltoallv"] += 1
        return real_ialltoallv(self, *a, **kw)
    monkeypatch.setattr(host.HostTransport, "work", work)
    monkeypatch.setattr(fmo.comm.Group, "ialltoallv", ialltoallv)
    for case in dispatch_checks.CASES:
        dispatch_checks.check_dispatch_combine_bitexact(comm, engine, case)
    dispatch_checks.check_fp8_pairs_and_capacity(comm, engine)
    dispatch_checks.check_autograd_against_dense_float64(comm, engine)
    all_agree(comm, seen["ialltoallv"] > 0 and seen["pinned work buffers"] == 0 and seen["device_buffers"],
              f"expected MPI on the device rows, no pinned staging: {seen}")


def test_device_buffers_handed_to_mpi_as_they_are(comm, monkeypatch):
    """What reaches Group.ialltoallv on the device-buffer path: dispatch's send rows are the
    gather kernel's output and its receive rows are recv_x's own storage (no copy between)."""
    need_ranks(comm, 2)
    monkeypatch.setenv("FMO_MPI_CUDA_AWARE", "1")
    monkeypatch.setattr(host, "packed_on_device", lambda t: True)
    world = comm.Get_size()
    gathered, received = [], []
    real_gather, real_ialltoallv = host.kernels.gather_rows, fmo.comm.Group.ialltoallv

    def gather_rows(src, index):
        out = real_gather(src, index)
        gathered.append(out.data_ptr())
        return out

    def ialltoallv(self, send, send_counts, recv, recv_counts, what):
        received.append((send.data_ptr(), recv.data_ptr(), what))
        return real_ialltoallv(self, send, send_counts, recv, recv_counts, what)
    monkeypatch.setattr(host.kernels, "gather_rows", gather_rows)
    monkeypatch.setattr(fmo.comm.Group, "ialltoallv", ialltoallv)
    torch.manual_seed(7 + comm.Get_rank())
    x = torch.randn(6, 64)
    idx = torch.randint(0, 2 * world, (6, 2))
    buf = fmo.moe.Buffer(fmo.comm.Group(comm), hidden=64, num_experts=2 * world)
    recv_x = buf.dispatch(x, idx)[0]
    first = next(r for r in received if r[2].startswith("dispatch payload"))
    all_agree(comm, first[0] in gathered and first[1] == recv_x.data_ptr(),
              f"send {first[0]} in gathered {gathered}, recv {first[1]} vs recv_x {recv_x.data_ptr()}")
    buf.destroy()
