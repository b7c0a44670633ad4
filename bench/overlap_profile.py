"""Why the two-micro-batch overlap loses on a CPU: the same MoELayer step with overlap=True and
overlap=False in ONE process (no group: nothing to communicate), interleaved by bench.stats,
plus the CPU time per step of each (work done, not waiting). bench/README.md has the answer.

    python -m bench.overlap_profile    # ~1 minute on the sim engine
"""
from __future__ import annotations

import time

import torch

import fastmoe_ops as fmo

from .stats import compare

H, I, E, K, T = 256, 256, 8, 2, 64   # bench_moe_layer's first CPU shape


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def step_of(overlap):
        torch.manual_seed(0)
        layer = fmo.nn.MoELayer(H, I, E, K, overlap=overlap, dtype=torch.bfloat16)

        def step():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(dy)
        return step

    steps = {m: step_of(m) for m in (False, True)}
    with fmo.use_backend("sim"):
        c = compare(steps[True], steps[False], device=torch.device("cpu"), max_seconds=25)
        print(f"one process, no communication, sim: overlap=True {c.ours_s:.3f} s, overlap=False {c.base_s:.3f} s, "
              f"ratio {c.ratio:.3f} [{c.ratio_lo:.3f}, {c.ratio_hi:.3f}] ({c.pairs} pairs)")
        for mode, step in steps.items():
            step()
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(3):
                step()
            print(f"overlap={mode}: CPU time {(time.process_time() - c0) / 3:.3f} s/step, wall {(time.perf_counter() - w0) / 3:.3f} s/step")


if __name__ == "__main__":
    main()
