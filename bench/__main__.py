"""The main job: every op's benchmark, side by side with what users would otherwise call.

    python -m bench [--quick] [--json FILE] [--plot DIR] [--results] [--engine sim|reference]
    mpirun -n 4 python -m bench [--quick] [--json FILE]   # the cross-rank MoE benchmarks

On a GPU: CUDA events, cold L2, medians, the device copy bandwidth measured in the same run
as the ceiling. On a CPU-only machine: small shapes through the `sim` engine (the kernels'
own source on the SIMT simulator) and the `reference` engine, labelled as such: these are
simulator throughputs, not GPU speeds.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

import fastmoe_ops as fmo
from fastmoe_ops.timing import time_fn

from . import bench_attention, bench_fp8, bench_moe, bench_moe_kernels, bench_sim, overhead_bench
from .harness import Row, format_table, plot, write_json
from .report import save_results
from .stats import compare, spread_over_run, steady_timing_process

# "host": host time per call of every public op beside torch.abs (bench/overhead_bench.py)
AREAS = {"fp8": bench_fp8, "attention": bench_attention, "moe": bench_moe_kernels, "sim": bench_sim, "host": overhead_bench}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate (bytes read + written) at 1 GiB: the memory ceiling."""
    if device.type != "cuda":
        return 0.0
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, reps=10)
    return 2 * n / t.median_s / 1e9


def matmul_tflops(device: torch.device) -> float:
    """bf16 torch.matmul rate at 8192^3 on random data: the tensor-core ceiling."""
    if device.type != "cuda":
        return 0.0
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device=device, reps=10)
    return 2 * n**3 / t.median_s / 1e12


def host_overhead_us() -> float | None:
    """Median host overhead of a warm call (bench/overhead_bench.py, pytest-benchmark), in
    its own process: measured inside this one, which by then holds every benchmark's tensors
    and threads, it read 11.4 us against 7.0 us in a fresh process (one run each, same machine)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).with_name("overhead_bench.py")),
                               "--benchmark-only", "-q", "--benchmark-disable-gc", f"--benchmark-json={out}",
                               "-p", "no:cacheprovider"], capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            print(f"host overhead benchmark failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            return None
        stats = json.loads(out.read_text())["benchmarks"][0]["stats"]
        return stats["median"] * 1e6


def self_check(device: torch.device, quick: bool) -> Row:
    """The statistics checking themselves: one baseline (SDPA forward) timed against itself with
    the same interleaving as every row. Its ratio must come out 'within noise' of 1.0x; if it
    does not, the machine's noise defeats the harness and no other row's verdict can be trusted."""
    import torch.nn.functional as F

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 4, 512, 64, generator=gen, device=device).to(torch.bfloat16) for _ in range(3))

    def base():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    c = compare(base, base, device=device, max_seconds=3.0 if quick else 6.0)
    return Row.compared("self_check", "sdpa B1 H4 S512 D64 causal", "torch", c, baseline="the same call")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short subset of shapes")
    p.add_argument("--json", type=Path, help="write all rows and the environment to this file")
    p.add_argument("--engine", choices=["sim", "reference"], help="CPU engine (default: every available one)")
    p.add_argument("--only", choices=sorted(AREAS), action="append", help="run only these areas")
    p.add_argument("--plot", type=Path, help="write PNG plots (rate against size, ours and baselines) here")
    p.add_argument("--results", action="store_true",
                   help="keep the run: bench/results/<device>-<date>.json + .md, and regenerate README's performance section")
    args = p.parse_args(argv)
    steady_timing_process(across_ranks=_mpi_world_size() > 1)

    if _mpi_world_size() > 1:
        return _main_across_ranks(args)

    if torch.cuda.is_available() and "cuda" in fmo.available_backends():
        device, engines = torch.device("cuda"), ["cuda"]
    else:
        device = torch.device("cpu")
        engines = [args.engine] if args.engine else [e for e in ("sim", "reference") if e in fmo.available_backends()]
        print(f"No GPU here: running small shapes on the CPU through the {' and '.join(engines)} engine(s). "
              "`sim` rows are simulator throughput (the kernels' own CUDA source run on the CPU), not GPU speed. "
              "Times are the process's CPU seconds, one thread per side (bench/stats.py).")
    copy = copy_bandwidth_gbps(device)
    if copy:
        print(f"device copy bandwidth (measured now): {copy:.0f} GB/s")
    ceilings = {"copy_gbps": copy, "bf16_matmul_tflops": matmul_tflops(device)}
    if ceilings["bf16_matmul_tflops"]:
        print(f"bf16 matmul 8192^3 (measured now): {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s")
    # On a CPU every row is checked and registered first, then timed in rounds (spread_over_run)
    spread = contextlib.nullcontext() if device.type == "cuda" else spread_over_run()
    with spread:
        rows = [self_check(device, args.quick)]
        jobs = [(name, module, engine) for name, module in AREAS.items() if not args.only or name in args.only
                for engine in engines]
        for name, module, engine in _progress(jobs):
            rows += module.run(device, engine, args.quick, copy)
    print(format_table(rows))
    overhead = host_overhead_us()
    if overhead is not None:
        print(f"host overhead per warm call (fp8 quantisation, pytest-benchmark median): {overhead:.1f} us")
    extra = {"ceilings": ceilings, "host_overhead_us": overhead}
    if args.json:
        write_json(args.json, rows, device, extra)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(rows, args.plot):
            print(f"wrote {path}")
    if args.results:
        for path in save_results(rows, device, extra):
            print(f"wrote {path}")
    return 0


def _main_across_ranks(args) -> int:
    """Under mpirun the main job is the cross-rank benchmarks (rank 0 prints and writes JSON):
    dispatch + combine against a raw Alltoallv of the same bytes (CPU) or the device copy
    bandwidth (GPU), then the MoE layer with overlap against the same layer run sequentially."""
    from . import bench_moe_layer

    quick = ["--quick"] if args.quick else []

    def json_for(name: str) -> list[str]:
        return ["--json", str(args.json.with_name(f"{args.json.stem}_{name}{args.json.suffix}"))] if args.json else []

    rc = bench_moe.main(quick + json_for("moe"))
    layer = bench_moe_layer.main(quick + json_for("moe_layer") + (["--plot", str(args.plot)] if args.plot else []))
    return rc or layer


def _mpi_world_size() -> int:
    import os

    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _progress(jobs):
    try:
        from tqdm import tqdm
    except ImportError:
        return jobs
    return tqdm(jobs, desc="benchmarks", unit="area", disable=not sys.stderr.isatty())


if __name__ == "__main__":
    sys.exit(main())
