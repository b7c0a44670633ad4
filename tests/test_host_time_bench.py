"""The host-time benchmark's plumbing (bench/overhead_bench.py; benchmarks print, this only
checks that every public op has a row on each CPU engine and that the kernel-skipping
context leaves the launcher as it found it)."""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.runtime import launch

from bench import overhead_bench

OPS = {"fp8.quantize_per_token_group", "fp8.quantize_per_block", "fp8.quantize_per_token_group_transposed", "fp8.gemm",
       "fp8.grouped_gemm_contiguous", "fp8.grouped_gemm_masked", "flash_attn", "flash_attn_varlen", "nn.FP8Linear",
       "nn.MoELayer[num_worst_tokens]"}


def test_every_public_op_has_a_row_and_the_launcher_is_restored():
    real = launch.sim_function, launch.tensor_span
    rows = overhead_bench.measure(torch.device("cpu"), "sim", calls=3, max_seconds=0.05)
    assert (launch.sim_function, launch.tensor_span) == real
    assert {name for name, *_ in rows} == set(overhead_bench.cases(torch.device("cpu"))) == OPS
    assert all(c.ours_s > 0 and c.base_s > 0 and c.pairs >= 8 for _, _, c in rows)


def test_bench_area_rows_come_from_a_fresh_process():
    rows = overhead_bench.rows_in_subprocess(["reference"], calls=3, max_seconds=0.05)
    assert {r.shape.split(" ", 1)[0] for r in rows} == OPS
    assert all(r.op == "host_time_per_call" and r.engine == "reference" and r.baseline.startswith("torch.abs")
               and r.stats["ratio_lo"] <= r.stats["ratio"] <= r.stats["ratio_hi"] for r in rows)
    assert "host" in __import__("bench.__main__", fromlist=["AREAS"]).AREAS
    assert fmo.backends.cpu_engine() == "sim"   # the measurement's use_backend did not leak
