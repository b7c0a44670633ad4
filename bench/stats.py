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

Slow noise: on a CPU the noise is not independent from pair to pair. A neighbour's load on the
shared caches and memory lasts about a second, so consecutive pairs share it: one process timing
one row (gather_reduce N512, sim) in 4-second windows gave window ratios of 0.31-0.34, each
stating +-3%, and its 0.8-second blocks read 0.26-0.37. An interval from order statistics alone
(pairs assumed independent) was then too narrow, and two runs disagreed on such rows. So the
interval is also at least the batch-means one: the pairs cut into consecutive time blocks, the
t interval of the blocks' median ratios (`block_interval`); and on a CPU a row is timed for at
least MIN_SPAN_CPU_S, so its blocks see more than one state of the machine.

Resolution: the interval of one run only sees the noise inside that run. Between runs the
machine itself changes (a 2-vCPU VM's neighbours, caches, frequency): two CPU runs of the main
job minutes apart gave intervals of +-1-2% whose medians were 3-5% apart (bench/README.md).
So the reported interval is never narrower than +-RESOLUTION around the median: a difference
below it is not one this harness can claim, and two runs agree within their stated intervals.
"""
from __future__ import annotations

import contextlib
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
MIN_SPAN_CPU_S = 2.0   # the shortest timing of one CPU row: several of the slow noise's ~1 s states
PAIRS_PER_BLOCK = 4    # batch means: a block's median needs a few pairs
MAX_BLOCKS = 8
# Student's t, two-sided 95%, by degrees of freedom (blocks - 1)
_T95 = {2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365}
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


def block_interval(ratios: list[float], blocks: list[slice] | None = None) -> tuple[float, float] | None:
    """(low, high) of the median ratio by batch means, or None with fewer than 3 blocks: the
    ratios (in time order) cut into consecutive blocks of at least PAIRS_PER_BLOCK (or the given
    ones: spread_over_run's rounds), each block's median, and the overall median
    times exp(-+ t95 * sd(log block medians) / sqrt(blocks)). Independent pairs give about the
    order-statistic interval; noise that holds for many pairs spreads the blocks apart and widens
    it (the order statistics assume every pair independent). In logs because a ratio is
    multiplicative: blocks 10x apart (a CPU baseline that jumped from 0.1 to 8 ms) gave a linear
    interval below zero."""
    if blocks is None:
        count, n = min(MAX_BLOCKS, len(ratios) // PAIRS_PER_BLOCK), len(ratios)
        blocks = [slice(i * n // count, (i + 1) * n // count) for i in range(count)]
    logs = [math.log(statistics.median(ratios[blk])) for blk in blocks if ratios[blk]]
    if len(logs) < 3:
        return None
    t95 = _T95.get(len(logs) - 1, Z95 if len(logs) > 30 else 2.3)   # 2.3: df 8-30, a little wide
    half = t95 * statistics.stdev(logs) / math.sqrt(len(logs))
    center = statistics.median(ratios)
    return center * math.exp(-half), center * math.exp(half)


def ratio_interval(a: list[float], b: list[float], blocks: list[slice] | None = None) -> tuple[float, float, float]:
    """(median, low, high) of the per-pair ratio b/a: the wider of the order-statistic interval
    and the batch-means one (block_interval)."""
    ratios = [y / x for x, y in zip(a, b)]
    r, lo, hi = median_ci(ratios)
    blocks = block_interval(ratios, blocks)
    if blocks is not None:
        lo, hi = min(lo, blocks[0]), max(hi, blocks[1])
    return r, lo, hi


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
            rel_ci: float = 0.05, max_seconds: float = 6.0, warmup: int = 2, max_pairs: int = 400,
            min_seconds: float | None = None) -> "Comparison | PendingComparison":
    """Time ours and baseline interleaved until the ratio's 95% interval is within rel_ci of the
    median (or max_seconds pass, or max_pairs), but for at least min_seconds (default: on a CPU
    MIN_SPAN_CPU_S, capped at max_seconds; on CUDA none). The order within a pair alternates too
    (A B, B A) so neither side always runs second on a warm cache. On a CPU inside
    spread_over_run: a PendingComparison, timed when the run's rows are all registered."""
    timer = _Timer(device)
    for _ in range(warmup):
        ours()
        baseline()
    if min_seconds is None:
        min_seconds = 0.0 if device.type == "cuda" else MIN_SPAN_CPU_S
    if _spread is not None and device.type != "cuda":
        pending = PendingComparison(timer, ours, baseline, rel_ci, max_seconds, min(min_seconds, max_seconds), max_pairs)
        _spread.append(pending)
        return pending
    start = time.perf_counter()
    return _interleaved(timer, ours, baseline, rel_ci=rel_ci, max_pairs=max_pairs,
                        out_of_time=lambda: time.perf_counter() - start > max_seconds,
                        long_enough=lambda: time.perf_counter() - start >= min(min_seconds, max_seconds))


def _interleaved(timed: Callable[[Callable[[], object]], float], ours: Callable[[], object],
                 baseline: Callable[[], object], *, rel_ci: float, max_pairs: int,
                 out_of_time: Callable[[], bool], long_enough: Callable[[], bool] = lambda: True,
                 agree: Callable[[float, float], tuple[float, float]] = lambda ta, tb: (ta, tb)) -> Comparison:
    """The pairs loop every comparison shares (_pairs), summarized."""
    return summarize(*_pairs(timed, ours, baseline, rel_ci=rel_ci, max_pairs=max_pairs, out_of_time=out_of_time,
                             long_enough=long_enough, agree=agree))


def _pairs(timed, ours, baseline, *, rel_ci: float, max_pairs: int, out_of_time: Callable[[], bool],
           long_enough: Callable[[], bool] = lambda: True,
           agree: Callable[[float, float], tuple[float, float]] = lambda ta, tb: (ta, tb)) -> tuple[list, list]:
    """(ours' times, baseline's times): A B, then B A, until the ratio's interval is within rel_ci
    of its median and long_enough() (the minimum span), out_of_time() says stop, or max_pairs.
    `agree` makes every rank hold the same samples under MPI (so every rank takes the same
    decision to stop)."""
    a, b = [], []
    run, stride = 0, 1   # pairs run; every stride-th couple (A B + B A) of them is kept
    while True:
        if run % 2:
            tb = timed(baseline)
            ta = timed(ours)
        else:
            ta = timed(ours)
            tb = timed(baseline)
        ta, tb = agree(ta, tb)
        if (run // 2) % stride == 0:
            a.append(ta)
            b.append(tb)
        run += 1
        if len(a) >= max_pairs:
            if long_enough() or out_of_time():
                break
            # Fast calls fill max_pairs before the minimum span: keep every other couple (both
            # orders stay equal in number) and from now on every 2*stride-th, so the samples
            # kept are spread evenly over the whole span.
            a = [t for i, t in enumerate(a) if (i // 2) % 2 == 0]
            b = [t for i, t in enumerate(b) if (i // 2) % 2 == 0]
            stride *= 2
        elif len(a) >= MIN_PAIRS and run % (2 * stride) == 0:
            r, lo, hi = ratio_interval(a, b)
            if ((hi - lo) / 2 <= rel_ci * r and long_enough()) or out_of_time():
                break
    return a, b


ROUNDS = 4   # spread_over_run: the slices each CPU row is timed in, one per pass over all rows
_spread: list | None = None   # the comparisons spread_over_run will time; None: compare times at once


class PendingComparison:
    """A CPU comparison registered by compare() inside spread_over_run and timed later, in ROUNDS
    slices: one per pass over every registered row, so each row's samples come from moments
    spread over the whole run. Why: the slow noise lasts tens of seconds too. The same row
    (gather_reduce N512, sim) timed in one process in consecutive 2-6 s windows read
    0.253 [0.240, 0.265] and, 10 s later, 0.326 [0.289, 0.363]. Two runs that time a row once
    each, minutes apart, compare two such moments, and any interval from one window misses the
    other; the stated interval holds the moments between the rounds. Row.compared registers its Row here, and finish() completes it.

    The batch-means blocks are the slices, one per round: two halves of one slice share its
    moment, and counting them as two blocks stated the interval sqrt(2) too narrow (with t of
    too many degrees of freedom); moe_gather_reduce N1024 (sim) then read 1.35 [1.26, 1.44] in
    one run and 1.55 [1.48, 1.63] in the next."""

    def __init__(self, timer, ours, baseline, rel_ci: float, max_seconds: float, min_seconds: float, max_pairs: int):
        self.timer, self.ours, self.baseline = timer, ours, baseline
        self.rel_ci, self.max_seconds, self.min_seconds, self.max_pairs = rel_ci, max_seconds, min_seconds, max_pairs
        self.a, self.b, self.blocks = [], [], []
        self.calls = 1   # per_call: every timed sample runs this many calls
        self.rows = []   # Rows that Row.compared built from this, completed by finish()
        self.result: Comparison | None = None
        self.bound = _bound_values(ours) + _bound_values(baseline)

    def _check_bindings(self) -> None:
        """Refuse closures whose variables were rebound since compare(): a loop that builds its
        closures in its own body rebinds them for the next shape, and a deferred timing would
        then time the last shape under every earlier row's name (build each shape's closures in
        a function call instead, as the bench modules do)."""
        now = _bound_values(self.ours) + _bound_values(self.baseline)
        if len(now) != len(self.bound) or any(a is not b for a, b in zip(now, self.bound)):
            raise RuntimeError(f"bench.stats.spread_over_run: a variable the closures of {self.ours!r} / "
                               f"{self.baseline!r} read was rebound after compare(); build each row's closures in "
                               "its own function call")

    def time_slice(self, rounds: int) -> None:
        """One slice: the budgets divided by the rounds; one block."""
        self._check_bindings()
        start = time.perf_counter()
        a, b = _pairs(self.timer, self.ours, self.baseline, rel_ci=self.rel_ci, max_pairs=self.max_pairs,
                      out_of_time=lambda: time.perf_counter() - start > self.max_seconds / rounds,
                      long_enough=lambda: time.perf_counter() - start >= self.min_seconds / rounds)
        self.blocks.append(slice(len(self.a), len(self.a) + len(a)))
        self.a += a
        self.b += b

    def per_call(self, calls: int) -> "PendingComparison":
        """As Comparison.per_call, applied when the comparison is completed."""
        self.calls *= calls
        return self

    def finish(self) -> Comparison:
        self.result = summarize(self.a, self.b, self.blocks).per_call(self.calls)
        for row in self.rows:
            row.take(self.result)
        self.ours = self.baseline = None   # the closures hold the row's tensors
        return self.result


def _bound_values(fn, depth: int = 3) -> tuple:
    """The objects fn's closure cells hold, and theirs for the functions among them (a lambda
    calling a closure), `depth` levels down. Kept (not their ids), so none is freed and its
    id reused by the object a loop rebinds the cell to."""
    out = ()
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:   # a cell not yet filled
            value = None
        out += (value,)
        if depth and callable(value) and getattr(value, "__closure__", None):
            out += _bound_values(value, depth - 1)
    return out


@contextlib.contextmanager
def spread_over_run(rounds: int = ROUNDS, report: Callable[[str], None] = print):
    """Inside: compare() on a CPU registers its comparison (PendingComparison) instead of timing
    it. On leaving: `rounds` passes over every registered comparison, each timing one slice of
    each, then every comparison (and its rows) is completed. CUDA comparisons are timed at once
    (their noise was not measured to need it). The registered closures, and their tensors, live
    until then: CPU shapes are small."""
    global _spread
    if _spread is not None:
        raise RuntimeError("spread_over_run: already inside one")
    _spread = []
    try:
        yield
        pending = _spread
    finally:
        _spread = None
    for r in range(rounds):
        report(f"timing round {r + 1}/{rounds}: {len(pending)} comparisons")
        for p in pending:
            p.time_slice(rounds)
    for p in pending:
        p.finish()


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
    min_seconds = 0.0 if device.type == "cuda" else min(MIN_SPAN_CPU_S, max_seconds)
    # Ranks hold identical samples, so they short-circuit alike and the allreduces in
    # long_enough and out_of_time are reached by all of them or by none.
    return _interleaved(timed, ours, baseline, rel_ci=rel_ci, max_pairs=max_pairs,
                        out_of_time=lambda: comm.allreduce(time.perf_counter() - start > max_seconds, op=MPI.LOR),
                        long_enough=lambda: comm.allreduce(time.perf_counter() - start >= min_seconds, op=MPI.LAND),
                        agree=lambda ta, tb: (comm.allreduce(ta, op=MPI.MAX), comm.allreduce(tb, op=MPI.MAX)))


def summarize(a: list[float], b: list[float], blocks: list[slice] | None = None) -> Comparison:
    """The Comparison of paired samples a (ours) and b (baseline); blocks: as block_interval."""
    oa, ob = median_ci(a), median_ci(b)
    ratio, lo, hi = ratio_interval(a, b, blocks)
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
