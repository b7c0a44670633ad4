"""Interleaved A/B timing with a confidence interval: the statistics every benchmark row uses.

Why interleaved: on a shared machine the load drifts over seconds (other processes start and
stop), so timing all of `ours` then all of the baseline compares two different machines.
Alternating A, B, A, B puts each pair under the same load; the ratio of a pair (baseline over
ours) cancels the drift, and the median of those per-pair ratios with its order-statistic
confidence interval says whether the difference is real.

Adaptive: pairs are added until the 95% interval of the median ratio is within `rel_ci` of the
median (relative half-width) or `max_seconds` of timing have passed, after warm-ups of both.
On CUDA each timed run starts on a flushed L2 (fastmoe_ops.timing.L2_FLUSH_BYTES overwritten
outside the timed region), timed with events.

Resolution: the interval of one run only sees the noise inside that run. Between runs the
machine itself changes (a 2-vCPU VM's neighbours, caches, frequency): two CPU runs of the main
job minutes apart gave intervals of +-1-2% whose medians were 3-5% apart (bench/README.md).
So the reported interval is never narrower than +-RESOLUTION around the median: a difference
below it is not one this harness can claim, and two runs agree within their stated intervals.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fastmoe_ops.timing import L2_FLUSH_BYTES

Z95 = 1.96
MIN_PAIRS = 8   # the order-statistic interval needs a few samples on each side of the median
RESOLUTION = 0.03  # smallest relative half-width ever stated (see the module docstring)


def steady_timing_process(*, across_ranks: bool) -> None:
    """What every benchmark process sets before it times anything: a heap that keeps what it
    freed (every machine: host-side work is timed on GPUs too), and on a CPU-only machine one
    thread per side. across_ranks: the process is one rank of an MPI job."""
    keep_freed_memory()
    one_thread_per_side_on_cpu(across_ranks=across_ranks)


# glibc's mallopt parameters (malloc.h) and the values the benchmarks fix them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 256 << 20   # larger blocks still go to mmap (and back to the system)
_TRIM_THRESHOLD_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Fix glibc malloc's thresholds so freed blocks below 256 MiB are kept and reused, not
    handed back to the system. Left dynamic (glibc's default), a process's threshold depends on
    what it freed before: the same reference quantiser (64 x 2048, one thread) then took
    0.36-0.50 ms per call in some processes and 1.1 ms in others (3 of 12), where each call
    mapped fresh pages and took 512 page faults (ru_minflt) and 0.55 ms of system time;
    with the thresholds fixed, 12 of 12 processes ran it at 0.36-0.38 ms. That is a property
    of the process, so no interval of one run could see it: two runs disagreed on such rows
    (bench/README.md). Returns whether the thresholds were set (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to fix
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


def one_thread_per_side_on_cpu(*, across_ranks: bool) -> None:
    """CPU runs: torch on one thread and, in a single process, the simulator on one worker
    (unless FMO_SIM_WORKERS is set). With torch's default of a thread per core, and the
    simulator's of a worker per CTA (up to 128), both sides of a pair fight over the 2 cores
    and over each other's spinning OpenMP threads: the same row differed up to 10x between two
    runs minutes apart (the ratio's intervals disjoint on 17 of 31 rows). One thread each
    measures the work, not the scheduler: two runs then agreed on 31 of 33 rows
    (bench/README.md). Across ranks the simulator keeps its default: the ipc transport's CTAs
    wait for their peers' CTAs, so (as on a GPU, where the comm grid fits the reserved SMs)
    the whole grid must be resident; one worker deadlocks them."""
    import os

    if torch.cuda.is_available():
        return
    torch.set_num_threads(1)
    if not across_ranks:
        os.environ.setdefault("FMO_SIM_WORKERS", "1")


def median_ci(samples: list[float], z: float = Z95) -> tuple[float, float, float]:
    """(median, low, high): the distribution-free interval of the median from order statistics
    (ranks n/2 -+ z*sqrt(n)/2; a binomial count of samples below the median)."""
    xs = sorted(samples)
    n = len(xs)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(xs), xs[lo], xs[hi]


@dataclass(frozen=True)
class Comparison:
    """One row's statistics: times of ours and the baseline, and their per-pair ratio."""
    ours_s: float
    ours_lo: float
    ours_hi: float
    base_s: float
    base_lo: float
    base_hi: float
    ratio: float       # median of baseline/ours over the pairs (> 1: ours is faster)
    ratio_lo: float
    ratio_hi: float
    pairs: int
    spread: float      # (p90 - p10) / median of ours' samples: the noise seen

    @property
    def conclusive(self) -> bool:
        """Does the interval of the ratio exclude 1.0 (a difference the noise cannot explain)?"""
        return self.ratio_lo > 1.0 or self.ratio_hi < 1.0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"conclusive": self.conclusive}

    def per_call(self, calls: int) -> "Comparison":
        """The same comparison when every timed sample ran `calls` calls: times per call (the
        ratio and its interval are unchanged)."""
        t = {k: getattr(self, k) / calls for k in ("ours_s", "ours_lo", "ours_hi", "base_s", "base_lo", "base_hi")}
        return dataclasses.replace(self, **t)


class _Timer:
    """One timed call of fn on `device`. CUDA: events around the call, L2 flushed before. CPU:
    the process's CPU seconds (user + system, all its threads: torch's and the simulator's
    workers), not wall time: on a shared 2-vCPU machine wall time also counts the moments
    another process (or the hypervisor) holds the core, which hit one side of a pair and not
    the other; with that, two main-job runs disagreed on 18 of 63 rows (sim rows up to 2.5x
    apart) against 3 of 37 on CPU seconds (bench/README.md)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        fn()   # untimed: the timed call then finds the caches this function warms, whatever ran before
        t0 = time.process_time()
        fn()
        return time.process_time() - t0


def compare(ours: Callable[[], object], baseline: Callable[[], object], *, device: torch.device,
            rel_ci: float = 0.05, max_seconds: float = 6.0, warmup: int = 2, max_pairs: int = 400) -> Comparison:
    """Time ours and baseline interleaved until the ratio's 95% interval is within rel_ci of the
    median (or max_seconds pass, or max_pairs). The order within a pair alternates too (A B, B A)
    so neither side always runs second on a warm cache."""
    timer = _Timer(device)
    for _ in range(warmup):
        ours()
        baseline()
    deadline = time.perf_counter() + max_seconds
    return _interleaved(timer, ours, baseline, rel_ci=rel_ci, max_pairs=max_pairs,
                        out_of_time=lambda: time.perf_counter() > deadline)


def _interleaved(timed: Callable[[Callable[[], object]], float], ours: Callable[[], object],
                 baseline: Callable[[], object], *, rel_ci: float, max_pairs: int,
                 out_of_time: Callable[[], bool],
                 agree: Callable[[float, float], tuple[float, float]] = lambda ta, tb: (ta, tb)) -> Comparison:
    """The pairs loop both comparisons share: A B, then B A, until the ratio's interval is within
    rel_ci of its median, out_of_time() says stop, or max_pairs. `agree` makes every rank hold the
    same samples under MPI (so every rank takes the same decision to stop)."""
    a, b = [], []
    while len(a) < max_pairs:
        if len(a) % 2:
            tb = timed(baseline)
            ta = timed(ours)
        else:
            ta = timed(ours)
            tb = timed(baseline)
        ta, tb = agree(ta, tb)
        a.append(ta)
        b.append(tb)
        if len(a) >= MIN_PAIRS:
            r, lo, hi = median_ci([y / x for x, y in zip(a, b)])
            if (hi - lo) / 2 <= rel_ci * r or out_of_time():
                break
    return summarize(a, b)


def compare_across_ranks(comm, ours: Callable[[], object], baseline: Callable[[], object], *, device: torch.device,
                         rel_ci: float = 0.05, max_seconds: float = 20.0, warmup: int = 1, max_pairs: int = 60) -> Comparison:
    """`compare` for a collective step run by every rank of `comm`: a barrier before each timed
    call, a call's time the slowest rank's (one allreduce per pair), so every rank holds the
    same samples and takes the same decision to stop (no rank can leave the loop alone)."""
    from mpi4py import MPI

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for _ in range(warmup):
        ours()
        baseline()
    sync()
    start = time.perf_counter()
    # Ranks hold identical samples, so they short-circuit alike and the allreduce in
    # out_of_time is reached by all of them or by none.
    return _interleaved(timed, ours, baseline, rel_ci=rel_ci, max_pairs=max_pairs,
                        out_of_time=lambda: comm.allreduce(time.perf_counter() - start > max_seconds, op=MPI.LOR),
                        agree=lambda ta, tb: (comm.allreduce(ta, op=MPI.MAX), comm.allreduce(tb, op=MPI.MAX)))


def summarize(a: list[float], b: list[float]) -> Comparison:
    """The Comparison of paired samples a (ours) and b (baseline)."""
    oa, ob = median_ci(a), median_ci(b)
    ratio, lo, hi = median_ci([y / x for x, y in zip(a, b)])
    r = (ratio, min(lo, ratio * (1 - RESOLUTION)), max(hi, ratio * (1 + RESOLUTION)))
    xs = sorted(a)
    p10, p90 = xs[int(0.1 * (len(xs) - 1))], xs[int(0.9 * (len(xs) - 1))]
    return Comparison(*oa, *ob, *r, pairs=len(a), spread=(p90 - p10) / oa[0] if oa[0] > 0 else 0.0)


def verdict(c: Comparison | None, ratio: float) -> str:
    """The speed-up column: the ratio with its interval when the noise cannot explain it, else
    'within noise' (with the interval, so a reader sees how wide the noise was)."""
    if c is None:
        return f"{ratio:.3g}x" if math.isfinite(ratio) else "n/a"
    span = f"[{c.ratio_lo:.3g}, {c.ratio_hi:.3g}]"
    return f"{c.ratio:.3g}x {span}" if c.conclusive else f"within noise {span}"
