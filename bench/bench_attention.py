"""Fused attention benchmarks: forward and backward of fmo.flash_attn against
torch.nn.functional.scaled_dot_product_attention on the same inputs in the same run.

On a GPU: bf16, 16k tokens per batch (B = 16384 / S), hidden 2048 (H = 2048 / D), S from
512 to 16k, D in {64, 128}, causal and not; every SDPA backend this torch/GPU runs is timed
(named: flash, efficient, cudnn, math), the fastest is the row's baseline and all ride in
`extra`. TFLOP/s counts only the (query, key) pairs the mask lets through (causal: about
half): forward 4 * pairs * D per head, backward 2.5x that (five matmuls to the forward's two).
On the CPU: tiny shapes through `sim` (the kernels' own source on the simulator) or
`reference`, against SDPA on the CPU: simulator throughput, not GPU speed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import fastmoe_ops as fmo
from fastmoe_ops.timing import time_fn

from .stats import compare
from .harness import Row

GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_TOKENS, GPU_HIDDEN = 16384, 2048
CPU_SHAPES = [(1, 128, 2, 64), (1, 128, 2, 128)]   # (B, S, H, D)


def visible_pairs(sq: int, sk: int, causal: bool) -> int:
    if not causal:
        return sq * sk
    return sum(max(0, min(sk, i + sk - sq + 1)) for i in range(sq))


def sdpa_backends(device) -> list[tuple[str, object]]:
    """(name, context manager factory) for every SDPA backend to try."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: whatever SDPA picks
        return [("sdpa (default)", contextlib.nullcontext)]
    if device.type != "cuda":
        return [("sdpa (cpu)", contextlib.nullcontext)]
    names = [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
             ("math", "MATH")]
    return [(f"sdpa[{n}]", (lambda b=getattr(SDPBackend, attr): sdpa_kernel(b))) for n, attr in names
            if hasattr(SDPBackend, attr)]


def _shapes(device, quick):
    if device.type != "cuda":
        shapes = CPU_SHAPES[:1] if quick else CPU_SHAPES
        return [(b, s, h, d, c) for b, s, h, d in shapes for c in (False, True)]
    seqs = GPU_SEQLENS[::2] if quick else GPU_SEQLENS
    return [(GPU_TOKENS // s, s, GPU_HIDDEN // d, d, c) for d in (64, 128) for s in seqs for c in (False, True)]


def run(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list[Row]:
    rows = []
    gpu = device.type == "cuda"
    reps = 10 if gpu else 2   # the scan over SDPA backends; the row itself is bench.stats.compare
    max_seconds = 3.0 if quick else 6.0
    gen = torch.Generator(device=device).manual_seed(0)
    ctx = contextlib.nullcontext if gpu else (lambda: fmo.use_backend(engine))
    def one(b, s, h, d, causal):  # a call per shape: its closures keep this shape's tensors (timed later: spread_over_run)
        q, k, v, dout = (torch.randn(b, s, h, d, generator=gen, device=device).to(torch.bfloat16) for _ in range(4))
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))  # SDPA: [B, H, S, D]

        def ours_fwd():
            with ctx():
                return fmo.flash_attn(q, k, v, causal=causal)

        with ctx():
            out = fmo.flash_attn(qg, kg, vg, causal=causal)
        want = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), is_causal=causal).transpose(1, 2)
        err = (out.float() - want).abs().max().item()
        if not err < 0.05:  # benchmarks print, tests assert: still, never time a wrong kernel
            raise RuntimeError(f"flash_attn ({engine}) differs from SDPA by {err:.3g} at {(b, s, h, d, causal)}: not timing it")

        def ours_bwd():
            with ctx():
                out.backward(dout, retain_graph=True)

        pairs = visible_pairs(s, s, causal)
        fwd_flops = 4.0 * b * h * pairs * d
        shape = f"B{b} S{s} H{h} D{d}{' causal' if causal else ''}"
        # each backend timed briefly to find the fastest; ours is then interleaved with that one
        base_fwd, base_bwd, fns = {}, {}, {}
        for name, kernel in sdpa_backends(device):
            if name == "sdpa[math]" and s > 4096:  # materialises [B, H, S, S] fp32: tens of GB, seconds
                continue
            try:
                with kernel():
                    o_ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                def fwd(kernel=kernel):
                    with kernel():
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                def bwd(kernel=kernel, o_ref=o_ref):
                    with kernel():
                        o_ref.backward(dout.transpose(1, 2), retain_graph=True)

                base_fwd[name] = time_fn(fwd, device=device, reps=reps).median_s
                base_bwd[name] = time_fn(bwd, device=device, reps=reps).median_s
                fns[name] = (fwd, bwd)
            except RuntimeError:  # this backend does not take this shape / dtype / GPU
                continue
        for i, (op, ours, base, flops) in enumerate((("attn_fwd", ours_fwd, base_fwd, fwd_flops),
                                                     ("attn_bwd", ours_bwd, base_bwd, 2.5 * fwd_flops))):
            if not base:
                continue
            best = min(base, key=base.get)
            c = compare(ours, fns[best][i], device=device, max_seconds=max_seconds)
            rows.append(Row.compared(op, shape, engine, c, baseline=best, flops=flops,
                                     extra={f"{n}_s": t for n, t in base.items()}))
    for b, s, h, d, causal in _shapes(device, quick):
        one(b, s, h, d, causal)
    return rows
