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


def _host_path(x: torch.Tensor, engine: str):
    fp8_quant._validate(x, 128, 1e-12)
    backends.engine_for(x=x)
    xq = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(x.shape[0], x.shape[1] // 128, dtype=torch.float32, device=x.device)
    plan = fp8_quant.plan_quantize_per_token_group(x, xq, xs, 128, False, 1e-12)
    if engine == "sim":
        launch.sim_function(plan.spec)  # warm: one dictionary lookup
    elif engine == "cuda":
        launch.cuda_function(plan.spec, x.device)
    return plan


def test_fp8_quant_host_overhead(benchmark):
    x = torch.randn(64, 1024).to(torch.bfloat16)
    if torch.cuda.is_available() and "cuda" in backends.available_backends():
        x, engine = x.cuda(), "cuda"  # the GPU path: CUDA tensors, the loaded-cubin lookup
    else:
        engine = backends.cpu_engine()
    if engine != "reference":
        _host_path(x, engine).run(engine)  # compile and load outside the timing
    benchmark.extra_info["engine"] = engine
    benchmark(_host_path, x, engine)
