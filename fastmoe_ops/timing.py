"""Timing for benchmarks: CUDA events on a GPU, perf_counter on the CPU; medians.

On a GPU every repetition runs on cold L2: a buffer larger than L2 is overwritten between
repetitions (outside the timed region), so the kernel reads its inputs from HBM as it
would inside a model.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than any Hopper L2 (50-60 MiB)


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    reps: int


def time_fn(fn: Callable[[], object], *, device: torch.device, reps: int = 20, warmup: int = 3, max_seconds: float = 5.0) -> Timing:
    """Median wall time of `fn()` on `device`; stops early after `max_seconds` of runs."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        start_evt = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        end_evt = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush.zero_()
            start_evt[i].record()
            fn()
            end_evt[i].record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(start_evt, end_evt)]
    else:
        budget_end = time.perf_counter() + max_seconds
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            if time.perf_counter() > budget_end:
                break
    return Timing(statistics.median(samples), min(samples), len(samples))
