"""The test kernels of ptx/wgmma_bf16.cuh (16-bit wgmma, SS and RS forms): tests/test_ptx_wgmma_bf16.py
says what they check. No conformance `cases()` yet: the simulator does not emulate these
instructions (ptx/wgmma_bf16.cuh says why), and a GPU case needs the numpy model of the 16-bit
shared-memory layouts and of HGMMA's arithmetic, which come with the emulation."""
from __future__ import annotations

SIZES = (64, 128, 192, 256)

# One warpgroup; per N an SS kernel (S = Q K^T shape: both K-major) and an RS kernel (O += P V
# shape: A from registers, B MN-major), and an f16 SS kernel. Descriptors point into dynamic
# shared memory; the image is copied there first. D is stored by the accumulator map.
SOURCE = r"""
#include "ptx/wgmma_bf16.cuh"
extern __shared__ __align__(1024) unsigned char wg16_smem[];

template <int N>
__device__ void wg16_store(float* D, const float (&acc)[N / 2]) {
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}

template <int N, int Form>  // Form 0: SS bf16, 1: RS bf16 (B transposed), 2: SS f16
__device__ void wg16_run(const unsigned char* image, int image_bytes, const uint32_t* a_regs, float* D,
                         int a_off, int b_off, int ksteps, int lbo, int sbo, int sw) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg16_smem[i] = image[i];
  fence_proxy_async_shared();  // generic-proxy stores -> wgmma's async-proxy reads
  __syncthreads();
  float acc[N / 2];
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
  wgmma_fence_operands(acc);
  wgmma_fence();
  for (int s = 0; s < ksteps; ++s) {
    const uint64_t da = make_smem_desc(wg16_smem + a_off + 32 * s, lbo, sbo, static_cast<Swizzle>(sw));
    const uint64_t db = make_smem_desc(wg16_smem + b_off + 32 * s, lbo, sbo, static_cast<Swizzle>(sw));
    if constexpr (Form == 0) {
      wgmma_m64nNk16_ss<N>(acc, da, db, s > 0);
    } else if constexpr (Form == 1) {
      uint32_t a[4];
      for (int e = 0; e < 4; ++e) a[e] = a_regs[(s * 128 + threadIdx.x) * 4 + e];
      wgmma_m64nNk16_rs<N, Wgmma16::bf16, 1>(acc, a, db, s > 0);
    } else {
      wgmma_m64nNk16_ss<N, Wgmma16::f16>(acc, da, db, s > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  wg16_store<N>(D, acc);
}

#define WG16_ENTRY(NAME, N, FORM)                                                                          \
  extern "C" __global__ void NAME(const unsigned char* image, int image_bytes, const uint32_t* a_regs,     \
                                  float* D, int a_off, int b_off, int ksteps, int lbo, int sbo, int sw) {  \
    wg16_run<N, FORM>(image, image_bytes, a_regs, D, a_off, b_off, ksteps, lbo, sbo, sw);                  \
  }
WG16_ENTRY(wgmma_bf16_ss_n64, 64, 0)
WG16_ENTRY(wgmma_bf16_ss_n128, 128, 0)
WG16_ENTRY(wgmma_bf16_ss_n192, 192, 0)
WG16_ENTRY(wgmma_bf16_ss_n256, 256, 0)
WG16_ENTRY(wgmma_bf16_rs_n64, 64, 1)
WG16_ENTRY(wgmma_bf16_rs_n128, 128, 1)
WG16_ENTRY(wgmma_bf16_rs_n192, 192, 1)
WG16_ENTRY(wgmma_bf16_rs_n256, 256, 1)
WG16_ENTRY(wgmma_f16_ss_n128, 128, 2)
"""
