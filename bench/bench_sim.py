"""Simulator speed on kernels built from the ptx/ wrappers (a benchmark: it prints).

  gemm    C[256,256] f32 = A[256,256] bf16 @ B[256,256] bf16: 64x64 CTA tiles, 4 warps of
          32x32, K tiles of 32 double-buffered with cp.async.cg, fragments by ldmatrix.x4,
          mma.sync.m16n8k16 bf16 -> f32. Checked against torch in float64 before timing.
  reduce  sum of 2^20 f32: ld.global.nc 16-byte loads, a warp shuffle tree, one red.add.f32
          per warp. Checked against torch in float64 before timing.

Each line: median wall time over --reps launches (the first, compiling, launch is not
timed), elements/s (GEMM: multiply-adds/s) and the simulator's fiber switch cost.

    python bench/bench_sim.py [--reps 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

HEADERS = """
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ld_st.cuh"
using namespace fmo::ptx;
"""

GEMM = r"""
// Shared memory: 2 stages x (A tile [64][32] + B^T tile [64][32]) bf16 at an 80-byte row
// pitch (64 data + 16 pad: rows stay 16-byte aligned, consecutive rows shift banks):
// 2 * 2 * 64 * 80 = 20480 bytes.
constexpr int BM = 64, BN = 64, BK = 32, PITCH = 80, STAGE = 2 * BM * PITCH;
extern __shared__ __align__(16) unsigned char smem[];

__device__ __forceinline__ void load_stage(unsigned char* s, const uint16_t* A, const uint16_t* Bt,
                                           int m0, int n0, int k0, int K) {
  for (int c = threadIdx.x; c < 2 * BM * (BK / 8); c += blockDim.x) {  // 16-byte chunks
    const int which = c / (BM * 4), row = (c / 4) % BM, part = c % 4;
    const uint16_t* src = which == 0 ? A + (size_t)(m0 + row) * K + k0 + part * 8
                                     : Bt + (size_t)(n0 + row) * K + k0 + part * 8;
    cp_async_cg16(s + which * BM * PITCH + row * PITCH + part * 16, src);
  }
  cp_async_commit();
}

// A: [M][K] bf16, Bt: [N][K] bf16 (B column-major), C: [M][N] f32; M, N % 64 == 0, K % 32 == 0.
extern "C" __global__ void gemm_bf16(const uint16_t* A, const uint16_t* Bt, float* C, int M, int N, int K) {
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int mat = lane / 8, r = lane % 8;
  float acc[2][4][4] = {};
  const int tiles = K / BK;
  load_stage(smem, A, Bt, m0, n0, 0, K);
  for (int kt = 0; kt < tiles; ++kt) {
    if (kt + 1 < tiles) {
      load_stage(smem + ((kt + 1) % 2) * STAGE, A, Bt, m0, n0, (kt + 1) * BK, K);
      cp_async_wait<1>();  // stage kt landed, kt + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned char* sa = smem + (kt % 2) * STAGE;
    const unsigned char* sb = sa + BM * PITCH;
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[2][4], b[4][2];
      for (int mi = 0; mi < 2; ++mi)  // x4: (rows +0..7, k +0..7) (+8..15, +0..7) (+0..7, +8..15) (+8..15, +8..15)
        ldmatrix_x4(a[mi], sa + (wm + mi * 16 + (mat % 2) * 8 + r) * PITCH + (kk + (mat / 2) * 8) * 2);
      for (int ni = 0; ni < 4; ni += 2) {  // x4: (n tile ni, k +0..7) (ni, +8..15) (ni+1, +0..7) (ni+1, +8..15)
        uint32_t q[4];
        ldmatrix_x4(q, sb + (wn + (ni + mat / 2) * 8 + r) * PITCH + (kk + (mat % 2) * 8) * 2);
        b[ni][0] = q[0]; b[ni][1] = q[1]; b[ni + 1][0] = q[2]; b[ni + 1][1] = q[3];
      }
      for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni) mma_m16n8k16_bf16(acc[mi][ni], a[mi], b[ni], acc[mi][ni]);
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  for (int mi = 0; mi < 2; ++mi)
    for (int ni = 0; ni < 4; ++ni)
      for (int i = 0; i < 4; ++i)
        C[(size_t)(m0 + wm + mi * 16 + g + 8 * (i >= 2)) * N + n0 + wn + ni * 8 + 2 * t + (i % 2)] = acc[mi][ni][i];
}
"""

REDUCE = r"""
// x: [n] f32, n % 4 == 0; out: one f32, zeroed by the caller.
extern "C" __global__ void reduce_sum(const float4* x, float* out, int n4) {
  float s = 0.0f;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += gridDim.x * blockDim.x) {
    const float4 v = ld_nc(x + i);
    s += (v.x + v.y) + (v.z + v.w);
  }
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) red_add(out, s);
}
"""


def module(code: str):
    from fastmoe_ops import sim
    from fastmoe_ops.runtime.compiler import include_options

    if not sim.available():
        sys.exit("bench_sim: the simulator is not built here (pip install -e .)")
    return sim.RawModule(code=HEADERS + code, options=tuple(include_options()))


def timed(fn, reps: int) -> float:
    fn()  # compile + warm up, not timed
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


GEMM_MNK = 256
REDUCE_N = 1 << 20


def checked_gemm(seed: int = 0):
    """The simulator's 256^3 bf16 GEMM launch, its result checked against float64 once."""
    M = N = K = GEMM_MNK
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(K, N, generator=g).to(torch.bfloat16)
    bt = b.t().contiguous()
    c = torch.full((M, N), float("nan"))
    f = module(GEMM).get_function("gemm_bf16")
    args = (a.view(torch.int16), bt.view(torch.int16), c, np.int32(M), np.int32(N), np.int32(K))

    def run():
        f((N // 64, M // 64), (128,), args, shared_mem=20480)

    run()
    ref = a.double() @ b.double()
    bound = 2 * (K + 1) * 2.0**-24 * (a.double().abs() @ b.double().abs())  # fp32 accumulation
    err = (c.double() - ref).abs()
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        raise SystemExit(f"gemm_bf16: wrong result at {divmod(worst, N)}: got {c.view(-1)[worst].item()}, "
                         f"want {ref.view(-1)[worst].item()} (seed {seed})")
    return run, float(err.max())


def bench_gemm(reps: int, seed: int = 0) -> dict:
    run, err = checked_gemm(seed)
    t = timed(run, reps)
    n = GEMM_MNK
    return {"name": "gemm_bf16 256x256x256 (mma.sync+ldmatrix+cp.async)", "seconds": t,
            "elements_per_s": n * n / t, "macs_per_s": n**3 / t, "max_abs_err": err}


def checked_reduce(seed: int = 0):
    """The simulator's 2^20 f32 reduction launch, its result checked against float64 once."""
    n = REDUCE_N
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    out = torch.zeros(1)
    f = module(REDUCE).get_function("reduce_sum")

    def run():
        out.zero_()
        f((256,), (256,), (x, out, np.int32(n // 4)))

    run()
    ref = x.double().sum().item()
    tol = 2 * 64 * 2.0**-24 * x.double().abs().sum().item()  # fp32 partial sums, depth << 64
    if not abs(out.item() - ref) <= tol:
        raise SystemExit(f"reduce_sum: got {out.item()}, want {ref} +- {tol} (seed {seed})")
    return run, abs(out.item() - ref)


def bench_reduce(reps: int, seed: int = 0) -> dict:
    run, err = checked_reduce(seed)
    t = timed(run, reps)
    return {"name": "reduce_sum 2^20 f32 (ld.global.nc.v4 + red.add.f32)", "seconds": t, "elements_per_s": REDUCE_N / t,
            "abs_err": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed launches per kernel (median reported)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    from fastmoe_ops import sim

    switch = sim.switch_ns()
    rows = [bench_gemm(args.reps), bench_reduce(args.reps)]
    print(f"simulator fiber switch: {switch:.1f} ns; median of {args.reps} launches")
    for r in rows:
        extra = f", {r['macs_per_s'] / 1e6:.2f} M MAC/s" if "macs_per_s" in r else ""
        print(f"{r['name']:<58} {r['seconds'] * 1e3:10.1f} ms  {r['elements_per_s'] / 1e6:8.3f} M elem/s{extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"switch_ns": switch, "reps": args.reps, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run(device: torch.device, engine: str, quick: bool, copy_gbps: float) -> list:
    """Rows for `python -m bench` on a CPU: the simulator's own throughput, next to torch
    doing the same arithmetic on the same CPU (so the gap reads as the price of simulation)."""
    if device.type != "cpu" or engine != "sim":
        return []
    from bench.harness import Row
    from bench.stats import compare

    budget = 4.0 if quick else 8.0
    gemm, _ = checked_gemm()
    a = torch.randn(GEMM_MNK, GEMM_MNK).to(torch.bfloat16)
    c_mm = compare(gemm, lambda: a.float() @ a.float(), device=device, max_seconds=budget)
    reduce, _ = checked_reduce()
    x = torch.randn(REDUCE_N)
    c_sum = compare(reduce, lambda: x.sum(), device=device, max_seconds=budget)
    return [
        Row.compared("sim_throughput", "gemm bf16 256^3 (mma.sync)", "sim", c_mm,
                     baseline="torch.matmul fp32 (CPU)", flops=2 * GEMM_MNK**3),
        Row.compared("sim_throughput", "reduce f32 2^20", "sim", c_sum,
                     baseline="torch.sum (CPU)", bytes_moved=4 * REDUCE_N),
    ]
