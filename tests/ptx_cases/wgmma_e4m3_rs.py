"""The kernel, layout model and cases of ptx/wgmma_e4m3_rs.cuh (wgmma m64nNk32 e4m3, A from
registers): tests/test_ptx_wgmma_e4m3_rs.py runs them on the simulator, tests/gpu/test_ptx_conformance.py
on an sm_90a GPU beside the simulator (bit for bit)."""
from __future__ import annotations

import numpy as np

from fastmoe_ops.reference import tensor_core

from .case import Case, assert_equal_bits, poisoned
from .formats import decode_bits, encode

# One warpgroup. A [64][32] e4m3 codes row-major in global memory: each thread builds its 4
# registers from it by the ISA's fragment map (byte b of thread (w, g, t4): row 16 w + g + 8 ((b / 4) % 2),
# k = 4 t4 + b % 4 + 16 (b / 8)); fmap = 1 builds them by the f32 accumulator's column map instead
# (k = 8 (b / 2 % 4 ...): a wrong map, which the check must reject). B [N][32] codes go to shared
# memory K-major without swizzle: (n, k) at (n / 8) SBO + (k / 16) LBO + (n % 8) 16 + k % 16,
# LBO 128, SBO 256. D [64][N] fp32 by the accumulator map.
SOURCE = r"""
#include "ptx/wgmma_e4m3_rs.cuh"
extern __shared__ __align__(1024) unsigned char rs_smem[];

template <int N>
__device__ void rs_run(const unsigned char* A, const unsigned char* B, float* D, int fmap) {
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, t4 = t % 4;
  for (int i = t; i < N * 32; i += blockDim.x) {
    const int n = i / 32, k = i % 32;
    rs_smem[(n / 8) * 256 + (k / 16) * 128 + (n % 8) * 16 + k % 16] = B[i];
  }
  fmo::ptx::fence_proxy_async_shared();  // generic-proxy stores -> wgmma's async-proxy reads
  __syncthreads();
  uint32_t a[4] = {0, 0, 0, 0};
  for (int b = 0; b < 16; ++b) {
    const int row = 16 * w + g + 8 * ((b / 4) % 2);
    const int k = fmap == 0 ? 4 * t4 + b % 4 + 16 * (b / 8) : 8 * ((b % 4) / 2) + 2 * t4 + b % 2 + 16 * (b / 8);
    a[b / 4] |= uint32_t(A[row * 32 + k]) << (8 * (b % 4));
  }
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
  fmo::ptx::wgmma_fence_operands(acc);
  fmo::ptx::wgmma_fence();
  fmo::ptx::wgmma_m64nNk32_e4m3_rs<N>(acc, a, fmo::ptx::make_smem_desc(rs_smem, 128, 256, fmo::ptx::Swizzle::none), 0);
  fmo::ptx::wgmma_commit();
  fmo::ptx::wgmma_wait<0>();
  fmo::ptx::wgmma_fence_operands(acc);
  for (int i = 0; i < N / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * t4 + (i % 2)] = acc[i];
}

extern "C" __global__ void wgmma_e4m3_rs_n64(const unsigned char* A, const unsigned char* B, float* D, int fmap) {
  rs_run<64>(A, B, D, fmap);
}
extern "C" __global__ void wgmma_e4m3_rs_n128(const unsigned char* A, const unsigned char* B, float* D, int fmap) {
  rs_run<128>(A, B, D, fmap);
}
"""


def case(seed: int, n: int, fmap: int = 0, structured: bool = False) -> Case:
    rng = np.random.default_rng(seed)
    if structured:  # A[m, k] = k-th power-of-two pattern: a misplaced k changes the sum
        a_vals = np.tile(2.0 ** (np.arange(32) % 8 - 4), (64, 1)) * np.where(np.arange(32) >= 16, -1, 1)
        a_vals = a_vals * (1 + (np.arange(64)[:, None] % 4) / 4)
        b_vals = np.tile(2.0 ** -(np.arange(32) // 8), (n, 1)) * (1 + np.arange(n)[:, None] % 8) / 8
    else:
        a_vals = rng.standard_normal((64, 32)) * 4
        b_vals = rng.standard_normal((n, 32))
    a_codes, b_codes = encode(a_vals, "e4m3"), encode(b_vals, "e4m3")
    want = tensor_core.wgmma_fp8(decode_bits(a_codes, "e4m3"), decode_bits(b_codes, "e4m3"), None)

    def check(outs):
        assert_equal_bits(outs[0], want, f"wgmma m64n{n}k32 RS e4m3 (fmap {fmap})", seed)

    return Case(name=f"rs_e4m3_n{n}" + ("_structured" if structured else "") + (f"_fmap{fmap}" if fmap else ""),
                kernel=f"wgmma_e4m3_rs_n{n}", grid=(1,), block=(128,),
                args=[a_codes.reshape(-1), b_codes.reshape(-1), poisoned((64, n), np.float32), np.int32(fmap)],
                outputs=[2], check=check, shared_mem=n * 32)


def cases(seed: int) -> list[Case]:
    """The GPU conformance cases (every one bit exact vs the QGMMA model, on both engines)."""
    return [case(seed, 64), case(seed + 1, 128), case(seed, 128, structured=True)]
