"""FP8 benchmarks. Quantisation: our kernel against the same computation in PyTorch ops
(what a user would write), same inputs, same run; GB/s of bytes actually moved."""
from __future__ import annotations

import torch

import fastmoe_ops as fmo
from fastmoe_ops.reference import fp8 as ref
from fastmoe_ops.timing import time_fn

from .harness import Row

GPU_SHAPES = [(128, 7168), (4096, 7168), (4096, 2048), (16384, 7168)]
CPU_SHAPES = [(16, 512), (64, 2048)]


def quant_bytes(m: int, k: int, elem: int, group: int = 128) -> int:
    return m * k * elem + m * k + m * (-(-k // group)) * 4


def run(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    rows = []
    shapes = (GPU_SHAPES[:2] if quick else GPU_SHAPES) if device.type == "cuda" else (CPU_SHAPES[:1] if quick else CPU_SHAPES)
    gen = torch.Generator(device=device).manual_seed(0)
    for m, k in shapes:
        x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)

        def ours():
            if engine == "cuda":
                return fmo.fp8.quantize_per_token_group(x, 128)
            with fmo.use_backend(engine):
                return fmo.fp8.quantize_per_token_group(x, 128)

        ours_out = ours()
        base_out = ref.quantize_per_token_group(x, 128)
        # Benchmarks print, tests assert: still, never time a wrong kernel.
        if not (torch.equal(ours_out[1], base_out[1]) and torch.equal(ours_out[0].view(torch.uint8), base_out[0].view(torch.uint8))):
            raise RuntimeError(f"fp8 quantisation ({engine}) disagrees with the reference at {m}x{k}: not timing it")
        t_ours = time_fn(ours, device=device, reps=30 if device.type == "cuda" else 5)
        t_base = time_fn(lambda: ref.quantize_per_token_group(x, 128), device=device, reps=30 if device.type == "cuda" else 5)
        rows.append(Row(op="fp8_quant_token_group", shape=f"{m}x{k} bf16", engine=engine, ours_s=t_ours.median_s,
                        baseline="torch ops (reference)", baseline_s=t_base.median_s, bytes_moved=quant_bytes(m, k, 2),
                        ceiling="device copy" if device.type == "cuda" else "", ceiling_rate=copy_gbps * 1e9))
    return rows
