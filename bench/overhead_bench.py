"""Host overhead of a warm call, with pytest-benchmark: everything the library does on the
host before the kernel runs (validation, engine choice, output allocation, heuristics,
Params, the compiled-function lookup), for the FP8 quantisation op.

    python -m pytest bench/overhead_bench.py --benchmark-only -q

The target is under 10 microseconds per call. `python -m bench` runs this file and reports
its median as a row.
"""
from __future__ import annotations

import torch

from fastmoe_ops import backends
from fastmoe_ops.ops import fp8_quant
from fastmoe_ops.runtime import launch


def _host_path(x: torch.Tensor):
    """The public call's own host path, stopped before the kernel: validation (cached per
    shape), engine choice, output allocation, Params, then the loaded-function lookup."""
    engine, plan, _, _ = fp8_quant.prepare_quantize_per_token_group(x, 128, False, 1e-12)
    if plan is not None:
        launch.lookup(plan.spec, engine, x.device)  # warm: one dictionary lookup
    return plan


def test_fp8_quant_host_overhead(benchmark):
    x = torch.randn(64, 1024).to(torch.bfloat16)
    if torch.cuda.is_available() and "cuda" in backends.available_backends():
        x, engine = x.cuda(), "cuda"  # the GPU path: CUDA tensors, the loaded-cubin lookup
    else:
        engine = backends.cpu_engine()
    if engine != "reference":
        _host_path(x).run(engine)  # compile and load outside the timing
    benchmark.extra_info["engine"] = engine
    benchmark(_host_path, x)
