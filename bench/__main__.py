"""The main job: every op's benchmark, side by side with what users would otherwise call.

    python -m bench [--quick] [--json FILE] [--engine sim|reference]

On a GPU: CUDA events, cold L2, medians, the device copy bandwidth measured in the same run
as the ceiling. On a CPU-only machine: small shapes through the `sim` engine (the kernels'
own source on the SIMT simulator) and the `reference` engine, labelled as such: these are
simulator throughputs, not GPU speeds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fastmoe_ops as fmo
from fastmoe_ops.timing import time_fn

from . import bench_fp8
from .harness import format_table, write_json

AREAS = {"fp8": bench_fp8}


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy rate (bytes read + written) at 1 GiB: the memory ceiling."""
    if device.type != "cuda":
        return 0.0
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, reps=10)
    return 2 * n / t.median_s / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short subset of shapes")
    p.add_argument("--json", type=Path, help="write all rows and the environment to this file")
    p.add_argument("--engine", choices=["sim", "reference"], help="CPU engine (default: every available one)")
    p.add_argument("--only", choices=sorted(AREAS), action="append", help="run only these areas")
    args = p.parse_args(argv)

    if torch.cuda.is_available() and "cuda" in fmo.available_backends():
        device, engines = torch.device("cuda"), ["cuda"]
    else:
        device = torch.device("cpu")
        engines = [args.engine] if args.engine else [e for e in ("sim", "reference") if e in fmo.available_backends()]
        print(f"No GPU here: running small shapes on the CPU through the {' and '.join(engines)} engine(s). "
              "`sim` rows are simulator throughput (the kernels' own CUDA source run on the CPU), not GPU speed.")
    copy = copy_bandwidth_gbps(device)
    if copy:
        print(f"device copy bandwidth (measured now): {copy:.0f} GB/s")
    rows = []
    for name, module in AREAS.items():
        if args.only and name not in args.only:
            continue
        for engine in engines:
            rows += module.run(device, engine, args.quick, copy)
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows, device)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
