"""bench/stats.py: the statistics every benchmark row uses (interleaving, the adaptive stop,
the interval of the median ratio, its resolution floor), on scripted timers so that nothing
here depends on the machine's speed."""
from __future__ import annotations

import itertools
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import stats


def scripted(times: dict):
    """A `timed` callable that returns the next scripted time of whichever function it is given,
    and records the order of the calls."""
    order, its = [], {name: iter(seq) for name, seq in times.items()}

    def timed(fn):
        order.append(fn.__name__)
        return next(its[fn.__name__])
    return timed, order


def ours():
    pass


def base():
    pass


def test_median_interval_is_the_order_statistics_around_the_median():
    xs = [float(i) for i in range(1, 101)]           # n = 100: ranks 50 -+ 1.96 * 10 / 2
    med, lo, hi = stats.median_ci(xs)
    assert med == 50.5
    assert (lo, hi) == (xs[math.floor(50 - 9.8)], xs[math.ceil(50 + 9.8) - 1])


def test_pairs_alternate_order_and_stop_once_the_interval_is_tight():
    timed, order = scripted({"ours": itertools.repeat(2.0), "base": itertools.repeat(1.0)})
    c = stats._interleaved(timed, ours, base, rel_ci=0.05, max_pairs=400, out_of_time=lambda: False)
    assert c.pairs == stats.MIN_PAIRS                 # identical pairs: tight from the first chance
    assert order[:4] == ["ours", "base", "base", "ours"]
    assert c.ratio == 0.5 and c.conclusive            # ours twice as slow: beyond any noise


def test_noisy_pairs_run_to_the_cap_and_a_difference_inside_the_noise_is_not_claimed():
    noise = [1.0, 1.3, 0.8, 1.2, 0.9, 1.1, 0.7, 1.25]
    timed, _ = scripted({"ours": itertools.cycle(noise), "base": itertools.cycle(noise[3:] + noise[:3])})
    c = stats._interleaved(timed, ours, base, rel_ci=0.01, max_pairs=40, out_of_time=lambda: False)
    assert c.pairs == 40
    assert not c.conclusive and c.ratio_lo < 1.0 < c.ratio_hi
    assert stats.verdict(c, c.ratio).startswith("within noise [")


def test_time_budget_stops_the_loop_after_the_minimum_pairs():
    timed, _ = scripted({"ours": itertools.cycle([1.0, 2.0]), "base": itertools.repeat(1.0)})
    c = stats._interleaved(timed, ours, base, rel_ci=0.0, max_pairs=400, out_of_time=lambda: True)
    assert c.pairs == stats.MIN_PAIRS


def test_stated_interval_is_never_narrower_than_the_resolution():
    c = stats.summarize([1.0] * 10, [1.02] * 10)      # a perfectly steady 2% difference
    assert c.ratio == pytest.approx(1.02)
    assert c.ratio_lo == pytest.approx(1.02 * (1 - stats.RESOLUTION))
    assert c.ratio_hi == pytest.approx(1.02 * (1 + stats.RESOLUTION))
    assert not c.conclusive                           # 2% is below what the harness can claim
    wide = stats.summarize([1.0, 2.0] * 8, [1.0] * 16)
    assert wide.ratio_hi - wide.ratio_lo > 2 * stats.RESOLUTION   # a wider statistical interval is kept


def test_slow_noise_widens_the_interval_beyond_the_order_statistics():
    """Ratios that hold for many pairs at a time (a neighbour's load lasting a second): the
    order statistics see many nearly equal samples and claim a tight interval; the batch-means
    interval sees the blocks disagree and covers the states the machine went through."""
    levels = [0.9, 1.0, 1.1, 1.0, 0.94, 1.06]             # six slow states, 10 pairs each
    ratios = [level * (1 + 0.001 * (i % 3)) for level in levels for i in range(10)]
    r, lo, hi = stats.median_ci(ratios)
    assert hi - lo < 0.01                                  # the order statistics alone: too narrow
    blo, bhi = stats.block_interval(ratios)
    assert blo < 0.95 and bhi > 1.05                       # the blocks spread it to about -+5%
    c = stats.summarize([1.0] * len(ratios), ratios)
    assert (c.ratio_lo, c.ratio_hi) == (pytest.approx(min(lo, blo)), pytest.approx(max(hi, bhi)))


def test_independent_noise_keeps_about_the_order_statistic_interval():
    g = torch.Generator().manual_seed(3)
    ratios = (1.0 + 0.05 * torch.randn(400, generator=g, dtype=torch.float64)).tolist()
    _, lo, hi = stats.median_ci(ratios)
    blo, bhi = stats.block_interval(ratios)
    assert (bhi - blo) < 2.0 * (hi - lo)


def test_block_interval_of_blocks_far_apart_stays_positive():
    """Blocks 10x apart (a CPU baseline that jumped from 0.1 ms to 8 ms mid-row): the interval is
    wide but a ratio's, never below zero."""
    lo, hi = stats.block_interval([1.0] * 8 + [10.0] * 4 + [0.1] * 4)
    assert 0 < lo < 0.2 and hi > 5


def test_few_pairs_have_no_block_interval():
    assert stats.block_interval([1.0] * (3 * stats.PAIRS_PER_BLOCK - 1)) is None
    assert stats.block_interval([1.0] * (3 * stats.PAIRS_PER_BLOCK)) == (1.0, 1.0)


def test_a_tight_interval_waits_for_the_minimum_span():
    timed, _ = scripted({"ours": itertools.repeat(2.0), "base": itertools.repeat(1.0)})
    checks = iter([False] * 5 + [True] * 100)
    c = stats._interleaved(timed, ours, base, rel_ci=0.05, max_pairs=400, out_of_time=lambda: False,
                           long_enough=lambda: next(checks))
    assert c.pairs == stats.MIN_PAIRS + 2 * 5              # checked after each couple (A B, B A): 8, 10, ... 18


def test_cpu_rows_are_timed_for_at_least_the_minimum_span(monkeypatch):
    monkeypatch.setattr(stats, "MIN_SPAN_CPU_S", 0.2)
    import time
    x = torch.randn(4096, dtype=torch.float64)
    t0 = time.perf_counter()
    c = stats.compare(lambda: x.sum(), lambda: x.sum(), device=torch.device("cpu"), max_seconds=5.0, max_pairs=16)
    assert time.perf_counter() - t0 >= 0.2
    assert c.pairs <= 16


def test_fast_calls_keep_evenly_spread_pairs_past_max_pairs():
    """max_pairs reached before the minimum span: every other couple is dropped and later only
    every 2nd (then 4th...) couple is kept, A B and B A alike."""
    clock = itertools.count()
    timed, order = scripted({"ours": (float(next(clock) + 1) for _ in itertools.count()),
                             "base": itertools.repeat(1.0)})
    spans = iter([False] * 3 + [True] * 100)
    c = stats._interleaved(timed, ours, base, rel_ci=0.0, max_pairs=16, out_of_time=lambda: False,
                           long_enough=lambda: next(spans))
    assert c.pairs == 16
    assert len(order) > 2 * 16 * 4                         # three thinnings: 8x the pairs run


def test_per_call_divides_the_times_and_keeps_the_ratio():
    c = stats.summarize([2.0, 2.2, 1.8] * 4, [1.0, 1.1, 0.9] * 4)
    p = c.per_call(100)
    assert p.ours_s == pytest.approx(c.ours_s / 100) and p.base_hi == pytest.approx(c.base_hi / 100)
    assert (p.ratio, p.ratio_lo, p.ratio_hi, p.pairs) == (c.ratio, c.ratio_lo, c.ratio_hi, c.pairs)


def test_compare_on_the_cpu_clock_returns_a_consistent_comparison():
    c = stats.compare(lambda: sum(range(2000)), lambda: sum(range(2000)), device=torch.device("cpu"),
                      max_seconds=0.2, warmup=1)
    assert c.pairs >= stats.MIN_PAIRS
    assert c.ratio_lo <= c.ratio <= c.ratio_hi and c.ours_lo <= c.ours_s <= c.ours_hi


def test_cpu_runs_use_one_thread_per_side(monkeypatch):
    threads = torch.get_num_threads()
    # A private environment: the function sets FMO_SIM_WORKERS, which must not leak into later
    # tests (one worker deadlocks kernels whose CTAs wait for each other).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "FMO_SIM_WORKERS"})
    try:
        stats.one_thread_per_side_on_cpu(across_ranks=True)
        assert torch.get_num_threads() == 1 and "FMO_SIM_WORKERS" not in os.environ   # ipc CTAs wait for peers
        stats.one_thread_per_side_on_cpu(across_ranks=False)
        assert os.environ["FMO_SIM_WORKERS"] == "1"
        monkeypatch.setenv("FMO_SIM_WORKERS", "4")    # a user's choice is kept
        stats.one_thread_per_side_on_cpu(across_ranks=False)
        assert os.environ["FMO_SIM_WORKERS"] == "4"
    finally:
        torch.set_num_threads(threads)


def test_benchmark_processes_keep_freed_memory():
    # In a fresh process (the thresholds are per process): once fixed, a block freed and taken
    # again is reused, not mapped anew; mapping anew cost the reference quantiser 512 page
    # faults per call in some processes (bench.stats.keep_freed_memory).
    probe = textwrap.dedent("""
        import resource, sys, torch
        from bench import stats
        print(int(stats.keep_freed_memory()))
        torch.set_num_threads(1)   # one heap: a worker thread's first use maps its own arena once
        for nbytes in (512 << 10, 2 << 20, 8 << 20):
            for _ in range(3):
                torch.empty(nbytes, dtype=torch.uint8).fill_(1)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(20):
                torch.empty(nbytes, dtype=torch.uint8).fill_(1)
            print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    if out[0] == "0":
        pytest.skip("not glibc: malloc's thresholds are not ours to fix")
    faults_per_block = [float(v) for v in out[1:]]
    # 4 KiB pages: 128-2048 per block if every block were mapped anew; a one-off fresh page
    # (a heap grown once by something else) stays far below a tenth of a block per call
    assert all(f < 0.1 * pages for f, pages in zip(faults_per_block, (128, 512, 2048))), faults_per_block


def test_spread_over_run_times_every_row_in_rounds_and_completes_its_rows():
    from bench.harness import Row

    x = torch.randn(2048, dtype=torch.float64)
    seen = []

    def ours():
        seen.append("ours")
        return x.sum()

    with stats.spread_over_run(rounds=3, report=lambda msg: None):
        c = stats.compare(ours, lambda: x.sum(), device=torch.device("cpu"), max_seconds=0.3, min_seconds=0.0)
        row = Row.compared("op", "shape", "sim", c, baseline="x.sum")
        assert isinstance(c, stats.PendingComparison) and math.isnan(row.ours_s)
        warm = len(seen)                                   # the warm-ups only, so far
    assert len(c.blocks) == 3 and c.blocks[-1].stop == len(c.a)   # one block per round
    assert len(seen) - warm >= 3 * 2 * stats.MIN_PAIRS      # each timed pair runs ours twice (warm + timed)
    assert row.ours_s > 0 and row.stats["pairs"] == len(c.a) and row.stats["ratio"] == c.result.ratio


def _three_rounds(levels_per_round, calls=1):
    """A PendingComparison timed in three rounds by a fake timer: ours always 1.0 s, the
    baseline at the given level in each round (each round alone steady)."""
    levels = iter([lv for lv in levels_per_round for _ in range(stats.MIN_PAIRS)])

    def ours():
        pass

    def base():
        pass

    pending = stats.PendingComparison(lambda fn: 1.0 if fn is ours else next(levels), ours, base, rel_ci=0.5,
                                      max_seconds=0.0, min_seconds=0.0, max_pairs=400).per_call(calls)
    for _ in range(3):
        pending.time_slice(3)
    return pending, pending.finish()


def test_rounds_that_see_different_machines_widen_the_interval():
    """Three rounds at three machine states (the baseline 10% slower, then 10% faster): each
    round alone is steady, so only the blocks across rounds can show the spread; with the
    rounds as the blocks: t with 2 degrees of freedom over the logs of the rounds' ratios."""
    pending, c = _three_rounds([1.0, 1.1, 0.9])
    assert c.pairs == 3 * stats.MIN_PAIRS and len(pending.blocks) == 3
    half = 4.303 * statistics.stdev([0.0, math.log(1.1), math.log(0.9)]) / math.sqrt(3)   # 0.249
    assert c.ratio == 1.0 and c.ratio_lo == pytest.approx(math.exp(-half)) and c.ratio_hi == pytest.approx(math.exp(half))
    # Halves of each round counted as blocks (the old rule) claimed a narrower interval from the
    # same samples: the halves of one round share its moment.
    halves = [slice(i * 4, i * 4 + 4) for i in range(6)]
    narrow = stats.summarize(pending.a, pending.b, halves)
    assert narrow.ratio_hi - narrow.ratio_lo < 0.6 * (c.ratio_hi - c.ratio_lo)
    # The same three rounds at one machine state: only the resolution floor remains.
    _, steady = _three_rounds([1.0, 1.0, 1.0])
    assert steady.ratio_lo == pytest.approx(1 - stats.RESOLUTION) and steady.ratio_hi == pytest.approx(1 + stats.RESOLUTION)


def test_pending_per_call_divides_the_times_not_the_ratio():
    _, c = _three_rounds([1.0, 1.1, 0.9], calls=500)
    _, one = _three_rounds([1.0, 1.1, 0.9])
    assert c.ours_s == pytest.approx(one.ours_s / 500) and c.base_s == pytest.approx(one.base_s / 500)
    assert (c.ratio, c.ratio_lo, c.ratio_hi) == (one.ratio, one.ratio_lo, one.ratio_hi)


def test_spread_over_run_refuses_nesting_and_times_nothing_after_an_error():
    with pytest.raises(ValueError):
        with stats.spread_over_run(report=lambda msg: None):
            c = stats.compare(lambda: None, lambda: None, device=torch.device("cpu"), warmup=0)
            raise ValueError("a row's check failed")
    assert c.result is None and stats._spread is None
    with stats.spread_over_run(report=lambda msg: None):
        with pytest.raises(RuntimeError, match="already inside"):
            with stats.spread_over_run():
                pass


def test_spread_over_run_refuses_closures_rebound_by_a_loop():
    """The classic late binding: closures made in a loop body read the loop's variables, so
    timed after the loop they would all time its last shape. Refused by name, not timed."""
    with pytest.raises(RuntimeError, match="rebound after compare"):
        with stats.spread_over_run(report=lambda msg: None):
            for n in (1024, 4096):
                x = torch.randn(n, dtype=torch.float64)
                stats.compare(lambda: x.sum(), lambda: x.sum(), device=torch.device("cpu"), warmup=0)
