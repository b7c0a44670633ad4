"""bench/stats.py: the statistics every benchmark row uses (interleaving, the adaptive stop,
the interval of the median ratio, its resolution floor), on scripted timers so that nothing
here depends on the machine's speed."""
from __future__ import annotations

import itertools
import math
import os
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
    assert all(f < 1.0 for f in faults_per_block), faults_per_block   # 4 KiB pages: 128-2048 if mapped anew
