"""fastmoe_ops.streams on the CPU: order, wait, failures, the submitter's context, and real
concurrency between two streams. Two simulator kernels in flight together on two streams
(which needs the launch to release the GIL) are proven in tests/test_trace.py. The CUDA
stream case: tests/gpu/test_streams_gpu.py."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import traceback

import pytest
import torch

import fastmoe_ops as fmo
import fastmoe_ops.streams as fs
from fastmoe_ops.backends import cpu_engine
from fastmoe_ops.errors import InputError

TIMEOUT = 30.0  # seconds a rendezvous may take on a loaded 2-core machine before we call it a hang


@pytest.fixture
def streams():
    made = []

    def make(role="compute"):
        s = fs.Stream("cpu", role=role)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_fifo_order_and_results(streams):
    s = streams()
    seen = []
    pendings = [s.submit(lambda i=i: (seen.append(i), i * i)[1]) for i in range(200)]
    assert [p.result() for p in pendings] == [i * i for i in range(200)]
    assert seen == list(range(200))
    s.synchronize()
    assert all(p.done() for p in pendings)


def test_submit_returns_before_the_work_runs(streams):
    s = streams()
    gate = threading.Event()
    p = s.submit(gate.wait, TIMEOUT)
    assert not p.done()  # the worker is blocked on the gate, yet submit came back
    gate.set()
    assert p.result() is True


def test_wait_orders_across_streams(streams):
    a, b = streams("comm"), streams("compute")
    gate = threading.Event()
    log = []
    pa = a.submit(lambda: (gate.wait(TIMEOUT), log.append("producer"))[1])
    b.wait(pa)
    pb = b.submit(lambda: log.append("consumer"))
    time.sleep(0.05)
    assert log == [] and not pb.done()  # the consumer is held back by the wait
    gate.set()
    pb.result()
    assert log == ["producer", "consumer"]


def _raise_here(msg):
    raise ValueError(msg)


def test_exception_reaches_result_with_traceback_and_stream_survives(streams):
    s = streams()
    p = s.submit(_raise_here, "boom")
    with pytest.raises(ValueError, match="boom") as info:
        p.result()
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "_raise_here" in frames, frames
    assert s.submit(lambda: 7).result() == 7  # the worker did not die


def test_wait_on_failed_work_fails_dependents_until_synchronize(streams):
    a, b = streams("comm"), streams("compute")
    bad = a.submit(_raise_here, "producer failed")
    b.wait(bad)
    dependent = b.submit(lambda: "must not run")
    with pytest.raises(fs.StreamError, match="waited on failed") as info:
        dependent.result()
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError):
        bad.result()
    b.synchronize()
    assert b.submit(lambda: "runs again").result() == "runs again"


def test_context_is_carried(streams):
    s = streams("comm")
    assert fs.current_role() is None
    with fmo.use_backend("reference"):
        p_backend = s.submit(cpu_engine)
    with torch.no_grad():
        p_nograd = s.submit(torch.is_grad_enabled)
    p_grad = s.submit(torch.is_grad_enabled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_autocast = s.submit(lambda: (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    p_plain = s.submit(lambda: torch.is_autocast_enabled("cpu"))
    p_role = s.submit(fs.current_role)
    assert p_backend.result() == "reference"
    assert p_nograd.result() is False and p_grad.result() is True
    assert p_autocast.result() == (True, torch.bfloat16) and p_plain.result() is False
    assert p_role.result() == "comm"
    assert fs.current_role() is None


def test_two_streams_run_at_the_same_time(streams):
    # Each function can finish only while the other is running too: completing at all proves
    # that the two workers ran concurrently (no timing threshold to tune).
    a, b = streams("comm"), streams("compute")
    rendezvous = threading.Barrier(2, timeout=TIMEOUT)
    pa, pb = a.submit(rendezvous.wait), b.submit(rendezvous.wait)
    assert {pa.result(), pb.result()} == {0, 1}


def test_bad_arguments():
    with pytest.raises(InputError, match="role"):
        fs.Stream("cpu", role="io")
    with pytest.raises(InputError, match="device"):
        fs.Stream("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(fmo.BackendError, match="CUDA is not available"):
            fs.Stream("cuda:0", role="comm")
    s = fs.Stream("cpu")
    try:
        with pytest.raises(InputError, match="callable"):
            s.submit(3)
        with pytest.raises(InputError, match="Pending"):
            s.wait("x")
    finally:
        s.close()
    with pytest.raises(fs.StreamError, match="closed"):
        s.submit(print)


def test_process_exits_with_work_in_flight():
    # A worker must neither hang the interpreter at exit nor be frozen mid-item: the atexit
    # hook lets queued work finish, then the process exits 0.
    code = (
        "import time, fastmoe_ops.streams as fs\n"
        "s = fs.Stream('cpu', role='comm')\n"
        "s.submit(time.sleep, 0.3)\n"
        "s.submit(lambda: print('last item ran', flush=True))\n"
        "t = fs.Stream('cpu'); t.submit(lambda: 1 / 0)\n"  # a failure nobody collects: no hang either
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "last item ran" in proc.stdout


def test_collected_stream_stops_its_worker():
    s = fs.Stream("cpu")
    thread = s._thread
    s.submit(lambda: None).result()
    del s
    import gc

    gc.collect()
    thread.join(TIMEOUT)
    assert not thread.is_alive()


class _FakeMPI:
    """Stands in for mpi4py.MPI initialised at a given thread level."""

    THREAD_SINGLE, THREAD_FUNNELED, THREAD_SERIALIZED, THREAD_MULTIPLE = 0, 1, 2, 3

    def __init__(self, level):
        self.level = level

    def Is_initialized(self):
        return True

    def Is_finalized(self):
        return False

    def Query_thread(self):
        return self.level


def test_cpu_stream_refuses_mpi_below_thread_multiple(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", _FakeMPI(_FakeMPI.THREAD_FUNNELED))
    with pytest.raises(fs.StreamError, match="THREAD_FUNNELED.*MPI_THREAD_MULTIPLE"):
        fs.Stream("cpu", role="comm")
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", _FakeMPI(_FakeMPI.THREAD_MULTIPLE))
    s = fs.Stream("cpu", role="comm")
    assert s.submit(lambda: 1).result() == 1
    s.close()
