"""Kernel trace: when each CTA of each kernel ran, per stream role, to prove overlap.

With FMO_TRACE=1 every kernel launched through the launcher is compiled with a trace
parameter (fastmoe_ops/runtime/spec.py, csrc/common/trace.cuh): thread 0 of each CTA stamps
%globaltimer at entry and after the CTA's last thread finished, appending a start and an
end event {launch id, CTA, SM, time} to a per-device buffer; collect() pairs them. The host keeps, per launch id, the
kernel's name, the engine and the role of the stream it was launched from
(`streams.current_role()`, "default" outside any stream).

    ft.clear()
    ...                                   # launches on "comm" and "compute" streams
    ivs = ft.collect()                    # [Interval], one per CTA (synchronises CUDA)
    ft.overlapped_fraction(ivs)           # |busy(comm) & busy(compute)| / |busy(comm)|
    ft.plot_timeline(ivs, "out/timeline.png")

`host_interval(name)` adds host work (an MPI exchange) as an interval of engine "host".
Clocks: every Interval is in time.monotonic_ns() nanoseconds. In the simulator %globaltimer
is that clock (CLOCK_MONOTONIC). On a GPU it has its own epoch: collect() maps it with a
clock probe (`clock_offset`), to within half the probe's round trip (microseconds), so CUDA
intervals compare with host intervals to that precision and with each other exactly.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import env
from .errors import FmoError, InputError, expect
from .runtime.launch import LaunchConfig, launch
from .runtime.spec import KernelSpec, Params, TraceArgs, register_op

RECORD_DTYPE = np.dtype([("launch_id", "<u4"), ("cta", "<u4"), ("smid", "<u4"), ("kind", "<u4"),
                         ("time_ns", "<u8")])  # = fmo::trace::Record: one start or end event
assert RECORD_DTYPE.itemsize == 24
_START, _END = 1, 2  # fmo::trace::kStart, kEnd


class TraceOverflowError(FmoError, RuntimeError):
    """More CTAs were traced than the buffer holds (FMO_TRACE_CAPACITY)."""


@dataclass(frozen=True)
class Interval:
    name: str        # kernel entry point, or the host_interval's name
    role: str        # stream role: "comm", "compute", or "default" outside any stream
    engine: str      # "cuda", "sim" or "host"
    start_ns: int
    end_ns: int
    cta: int         # linear block index (-1 for host intervals)
    launch_id: int   # (-1 for host intervals)
    sm: int = -1     # %smid (sim: the worker thread's id)


def enabled() -> bool:
    return env.flag("FMO_TRACE")


# ----------------------------------------------------------------------- trace buffers


class _Buffer:
    """One device's records and counter (device memory on CUDA, host memory in sim)."""

    def __init__(self, device: torch.device, capacity: int):
        self.device = device
        self.capacity = capacity
        self.records = torch.zeros(capacity * RECORD_DTYPE.itemsize, dtype=torch.uint8, device=device)  # Record[capacity]
        self.count = torch.zeros(1, dtype=torch.int64, device=device)  # unsigned long long on the device
        if device.type == "cuda":
            # zeroed on this stream, written by kernels on any stream: finish the zeroing first
            torch.cuda.synchronize(device)

    def ranges(self) -> tuple[tuple[int, int], ...]:
        return ((self.records.data_ptr(), self.records.numel()), (self.count.data_ptr(), 8))


@dataclass
class KernelArgs:
    """What a traced launch passes: the kernel's TraceArgs, and the buffer's memory ranges
    (the simulator's memory checker must allow the record writes)."""

    args: TraceArgs
    ranges: tuple[tuple[int, int], ...]

    def in_flight(self):
        return _in_flight()


_lock = threading.Lock()
_buffers: dict[str, _Buffer] = {}
_launches: dict[int, tuple[str, str, str]] = {}  # launch id -> (kernel name, role, engine)
_host: list[Interval] = []
_next_id = 1  # 0 never names a launch: a record still holding zeros was never written
_sim_running = 0
_sim_idle = threading.Condition(_lock)


def _capacity() -> int:
    capacity = env.integer("FMO_TRACE_CAPACITY")
    if not 1 <= capacity < 2**31:
        raise InputError(f"FMO_TRACE_CAPACITY: expected a positive number of records below 2^31, got {capacity}")
    return capacity


def kernel_args(name: str, engine: str, device: torch.device) -> KernelArgs:
    """Register one launch of kernel `name` and return its trace arguments."""
    global _next_id
    from .streams import current_role

    key = str(device) if device.type == "cpu" or device.index is not None else f"cuda:{torch.cuda.current_device()}"
    with _lock:
        buf = _buffers.get(key)
        if buf is None:
            buf = _buffers[key] = _Buffer(torch.device(key), _capacity())
        launch_id = _next_id
        if launch_id >= 2**32:
            raise TraceOverflowError("trace: more than 2^32 - 1 launches traced in this process")
        _next_id += 1
        _launches[launch_id] = (name, current_role() or "default", engine)
    args = TraceArgs(records=buf.records.data_ptr(), count=buf.count.data_ptr(), capacity=buf.capacity,
                     launch_id=launch_id)
    return KernelArgs(args, buf.ranges())


@contextlib.contextmanager
def _in_flight():
    global _sim_running
    with _lock:
        _sim_running += 1
    try:
        yield
    finally:
        with _lock:
            _sim_running -= 1
            if _sim_running == 0:
                _sim_idle.notify_all()


@contextlib.contextmanager
def host_interval(name: str):
    """Record the block's wall time as an interval of engine "host" (when tracing is on)."""
    if not enabled():
        yield
        return
    from .streams import current_role

    role = current_role() or "default"
    start = time.monotonic_ns()
    try:
        yield
    finally:
        end = time.monotonic_ns()
        with _lock:
            _host.append(Interval(name, role, "host", start, end, -1, -1))


def _wait_idle() -> None:
    """Sim launches still running on other threads would write records while we read."""
    for buf in list(_buffers.values()):
        if buf.device.type == "cuda":
            torch.cuda.synchronize(buf.device)
    with _lock:
        while _sim_running:
            _sim_idle.wait()


def clear() -> None:
    """Forget every record, launch and host interval (after waiting for running kernels).
    The next traced launch allocates a buffer of the current FMO_TRACE_CAPACITY."""
    _wait_idle()
    with _lock:
        _buffers.clear()
        _launches.clear()
        _host.clear()


def collect() -> list[Interval]:
    """Every traced CTA and host interval so far, sorted by start. Raises
    TraceOverflowError if a buffer overflowed: a truncated trace could hide an overlap."""
    _wait_idle()
    with _lock:
        buffers = list(_buffers.values())
        launches = dict(_launches)
        out = list(_host)
    for buf in buffers:
        count = int(buf.count.cpu().item())
        if count > buf.capacity:
            raise TraceOverflowError(
                f"trace buffer of {buf.device} overflowed: {count} events (2 per CTA) for {buf.capacity} slots "
                f"(FMO_TRACE_CAPACITY); raise it or call trace.clear() more often")
        recs = np.frombuffer(buf.records[: count * RECORD_DTYPE.itemsize].cpu().numpy().tobytes(), dtype=RECORD_DTYPE)
        ivs = _pair(recs, launches, buf.device)
        if buf.device.type == "cuda" and ivs:
            offset, _ = clock_offset("cuda", buf.device)
            ivs = [dataclasses.replace(i, start_ns=i.start_ns - offset, end_ns=i.end_ns - offset) for i in ivs]
        out.extend(ivs)
    out.sort(key=lambda iv: (iv.start_ns, iv.end_ns))
    return out


def _pair(recs, launches, device) -> list[Interval]:
    """One Interval per (launch, CTA) from its start and end events."""
    starts: dict[tuple[int, int], tuple[int, int]] = {}
    out = []
    for r in recs:
        key = (int(r["launch_id"]), int(r["cta"]))
        kind, t = int(r["kind"]), int(r["time_ns"])
        if key[0] not in launches or kind not in (_START, _END):
            raise FmoError(f"trace buffer of {device}: corrupt event {r} (unknown launch or kind)")
        if kind == _START:
            if key in starts:
                raise FmoError(f"trace buffer of {device}: launch {key[0]} CTA {key[1]} started twice")
            starts[key] = (t, int(r["smid"]))
            continue
        start = starts.pop(key, None)
        if start is None or t < start[0]:
            raise FmoError(f"trace buffer of {device}: launch {key[0]} CTA {key[1]}: end event without an earlier start")
        name, role, engine = launches[key[0]]
        out.append(Interval(name, role, engine, start[0], t, key[1], key[0], start[1]))
    if starts:
        (lid, cta), _ = next(iter(starts.items()))
        raise FmoError(f"trace buffer of {device}: {len(starts)} CTAs started and never ended "
                       f"(first: {launches[lid][0]} CTA {cta}); collect() after the kernels finished")
    return out


# ------------------------------------------------------------------------------ analysis


def _merge(spans) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def by_role(ivs) -> dict[str, list[tuple[int, int]]]:
    """Busy time per role: the union of its intervals, as sorted disjoint (start, end)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for iv in ivs:
        spans.setdefault(iv.role, []).append((iv.start_ns, iv.end_ns))
    return {role: _merge(s) for role, s in spans.items()}


def _intersection(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int:
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def why_no_kernel_intervals() -> str:
    """What to change when a trace holds no kernel intervals: the variable that switches
    tracing on, and the engine that launches kernels for CPU tensors."""
    if not enabled():
        return " (FMO_TRACE is not set to 1: kernels record intervals only when it is, before they launch)"
    return (" (FMO_TRACE=1 is set; CPU tensors launch kernels only on the sim engine: FMO_BACKEND=sim or "
            "use_backend('sim'); the default `reference` engine runs PyTorch, with nothing to trace)")


def _busy(ivs, role: str) -> list[tuple[int, int]]:
    roles = by_role(ivs)
    if role not in roles:
        hint = why_no_kernel_intervals() if not any(iv.engine != "host" for iv in ivs) else ""
        raise InputError(f"role {role!r}: expected intervals of it in the trace, got roles {sorted(roles)}{hint}")
    return roles[role]


def overlapped_fraction(ivs, a: str = "comm", b: str = "compute") -> float:
    """|busy(a) ∩ busy(b)| / |busy(a)|: the share of a's busy time hidden under b's."""
    busy_a, busy_b = _busy(ivs, a), _busy(ivs, b)
    total = sum(e - s for s, e in busy_a)
    if total == 0:
        raise InputError(f"role {a!r}: its intervals have zero total length; no fraction to report")
    return _intersection(busy_a, busy_b) / total


def in_flight_together(ivs, a: str = "comm", b: str = "compute") -> bool:
    """Some interval of role a intersects (for a positive time) some interval of role b."""
    return _intersection(_busy(ivs, a), _busy(ivs, b)) > 0


def plot_timeline(ivs, path) -> None:
    """PNG timeline: one row per role; `ivs` may be one trace or a list of traces (one per
    rank), giving one row per (rank, role). Times in microseconds from the earliest start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [list(t) for t in ivs] if ivs and not isinstance(ivs[0], Interval) else [list(ivs)]
    rows = []  # (label, [(start, width)])
    t0 = min((iv.start_ns for t in traces for iv in t), default=0)
    for rank, trace in enumerate(traces):
        for role, spans in sorted(by_role(trace).items()):
            label = f"rank {rank} {role}" if len(traces) > 1 else role
            rows.append((label, [((s - t0) / 1e3, max((e - s) / 1e3, 1e-3)) for s, e in spans]))
    colors = {"comm": "tab:orange", "compute": "tab:blue"}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.6 * max(1, len(rows))))
    for i, (label, bars) in enumerate(rows):
        ax.broken_barh(bars, (i - 0.4, 0.8), color=colors.get(label.split()[-1], "tab:gray"))
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("time (us)")
    ax.set_title("kernel trace: busy intervals per stream role")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------- rendezvous probe


class RendezvousParams(Params):
    cpp_name = "fmo::trace::RendezvousParams"
    _fields_ = [
        ("flags", ctypes.c_void_p),
        ("met", ctypes.c_void_p),
        ("timeout_ns", ctypes.c_uint64),
        ("me", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RendezvousSpec(KernelSpec):
    """Probe kernel (csrc/common/trace.cuh): announces itself, waits for its partner."""

    op: ClassVar[str] = "trace_rendezvous"
    header: ClassVar[str] = "csrc/common/trace.cuh"
    params: ClassVar[type[Params]] = RendezvousParams

    def block_threads(self) -> int:
        return 32

    def device_call(self) -> str:
        return "fmo::trace::rendezvous(p)"


@register_op("trace_rendezvous")
def _rendezvous_specs():
    yield RendezvousSpec()


def rendezvous(flags: torch.Tensor, met: torch.Tensor, me: int, *, timeout_s: float, engine: str) -> None:
    """Launch one side (`me` = 0 or 1) of the rendezvous probe on the current stream.

    flags: [2] int32, zero before the pair starts; met: [2] int32, receives 1 where side `me`
    saw its partner, 2 where it gave up after `timeout_s`. Both sides reading 1 proves that
    the two launches were resident at the same time (the test of two streams overlapping)."""
    for name, t in (("flags", flags), ("met", met)):
        expect(isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.shape == (2,) and t.is_contiguous(),
               name, "a contiguous [2] int32 tensor", lambda: f"{t!r:.80}")
    expect(flags.device == met.device, "met", f"a tensor on {flags.device} (like flags)", lambda: f"one on {met.device}")
    expect(me in (0, 1), "me", "0 or 1", lambda: repr(me))
    expect(0 < timeout_s < 1e6, "timeout_s", "a positive number of seconds", lambda: repr(timeout_s))
    params = RendezvousParams(flags=flags.data_ptr(), met=met.data_ptr(), timeout_ns=int(timeout_s * 1e9), me=me,
                              reserved=0)
    launch(RendezvousSpec(), LaunchConfig.make(1, 32), params, engine=engine, tensors=(flags, met))


# ------------------------------------------------------------------------ clock probe


class ClockParams(Params):
    cpp_name = "fmo::trace::ClockParams"
    _fields_ = [("out", ctypes.c_void_p)]


@dataclass(frozen=True)
class ClockSpec(KernelSpec):
    """Reads %globaltimer once (csrc/common/trace.cuh). Not traced: it measures the trace."""

    op: ClassVar[str] = "trace_clock"
    header: ClassVar[str] = "csrc/common/trace.cuh"
    params: ClassVar[type[Params]] = ClockParams
    traceable: ClassVar[bool] = False

    def block_threads(self) -> int:
        return 32

    def device_call(self) -> str:
        return "fmo::trace::clock_probe(p)"


@register_op("trace_clock")
def _clock_specs():
    yield ClockSpec()


def clock_offset(engine: str, device, probes: int = 5) -> tuple[int, int]:
    """(offset, uncertainty) in ns with device_time = host_time + offset, host time being
    time.monotonic_ns(). Each probe brackets one %globaltimer read between two host reads;
    the tightest bracket wins and its half-width is the uncertainty."""
    device = torch.device(device)
    out = torch.zeros(1, dtype=torch.int64, device=device)
    best = None
    for _ in range(probes):
        t0 = time.monotonic_ns()
        launch(ClockSpec(), LaunchConfig.make(1, 32), ClockParams(out=out.data_ptr()), engine=engine, tensors=(out,))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.monotonic_ns()
        width = t1 - t0
        if best is None or width < best[1]:
            best = (int(out.cpu().item()) - (t0 + t1) // 2, width)
    return best[0], (best[1] + 1) // 2
