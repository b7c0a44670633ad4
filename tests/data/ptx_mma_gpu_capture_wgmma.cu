// The wgmma harness of tests/test_ptx_wgmma.py as it ran on the H200 for ptx_mma_gpu_capture.npz
// (commit 47756b9, HEADERS of tests/test_ptx_support.py + SOURCE); kept verbatim so the replay
// runs the very kernels that produced the stored outputs.

#include "ptx/common.cuh"
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/barrier.cuh"
using namespace fmo::ptx;

#include "ptx/wgmma.cuh"
extern __shared__ __align__(1024) unsigned char wg_smem[];

template <int N>
__device__ void store_d(float* D, const float (&acc)[N / 2]) {
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) D[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)] = acc[i];
}

__device__ void mma_n(float (&d)[64], uint64_t a, uint64_t b, int s) { wgmma_m64n128k32_e4m3(d, a, b, s); }
__device__ void mma_n(float (&d)[32], uint64_t a, uint64_t b, int s) { wgmma_m64n64k32_e4m3(d, a, b, s); }

template <int N>
__device__ void wgmma_run(const unsigned char* image, int image_bytes, const float* C, float* D,
                          const int* a_off, const int* b_off, int ksteps, int a_lbo, int a_sbo, int a_sw,
                          int b_lbo, int b_sbo, int b_sw, int accumulate_c, int mode, int poke_off,
                          int poke_bytes, const unsigned char* poke) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg_smem[i] = image[i];
  fence_proxy_async_shared();  // generic-proxy stores -> wgmma's async-proxy reads
  __syncthreads();
  float acc[N / 2];
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) acc[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + (i % 2)];
  wgmma_fence_operands(acc);  // the loads of C stay before the fence
  if (mode != 3) wgmma_fence();
  for (int s = 0; s < ksteps; ++s) {
    const uint64_t da = make_smem_desc(wg_smem + a_off[s], a_lbo, a_sbo, static_cast<Swizzle>(a_sw));
    const int b_skew = (mode == 4 && w == 3) ? 16 : 0;  // warp 3 names other B bytes
    const uint64_t db = make_smem_desc(wg_smem + b_off[s] + b_skew, b_lbo, b_sbo, static_cast<Swizzle>(b_sw));
    mma_n(acc, da, db, (s > 0 || accumulate_c) ? 1 : 0);
  }
  wgmma_commit();
  if (mode == 1) store_d<N>(D, acc);
  if (mode == 2) {
    __syncthreads();
    for (int i = threadIdx.x; i < poke_bytes; i += blockDim.x) wg_smem[poke_off + i] = poke[i];
    fence_proxy_async_shared();
    __syncthreads();
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  if (mode != 1) store_d<N>(D, acc);
}

#define WGMMA_ENTRY(NAME, N)                                                                                   \
  extern "C" __global__ void NAME(const unsigned char* image, int image_bytes, const float* C, float* D,        \
                                  const int* a_off, const int* b_off, int ksteps, int a_lbo, int a_sbo, int a_sw, \
                                  int b_lbo, int b_sbo, int b_sw, int accumulate_c, int mode, int poke_off,    \
                                  int poke_bytes, const unsigned char* poke) {                                 \
    wgmma_run<N>(image, image_bytes, C, D, a_off, b_off, ksteps, a_lbo, a_sbo, a_sw, b_lbo, b_sbo, b_sw,       \
                 accumulate_c, mode, poke_off, poke_bytes, poke);                                              \
  }
WGMMA_ENTRY(wgmma_e4m3, 128)
WGMMA_ENTRY(wgmma_e4m3_n64, 64)

// Two accumulators, one commit group each: after wait_group 1 the first group has retired
// (D1 = A B + C) and the second has not (D2 still C); after wait_group 0 both have.
// D: [3][64][128] = D1 after wait 1, D2 after wait 1, D2 after wait 0.
extern "C" __global__ void wgmma_two_groups(const unsigned char* image, int image_bytes, const float* C, float* D,
                                            int a_off, int b_off, int sbo) {
  for (int i = threadIdx.x; i < image_bytes; i += blockDim.x) wg_smem[i] = image[i];
  fence_proxy_async_shared();
  __syncthreads();
  float acc1[64], acc2[64];
  const int t = threadIdx.x, w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < 64; ++i)
    acc1[i] = acc2[i] = C[(16 * w + g + 8 * ((i / 2) % 2)) * 128 + 8 * (i / 4) + 2 * q + (i % 2)];
  wgmma_fence_operands(acc1);
  wgmma_fence_operands(acc2);
  wgmma_fence();
  const uint64_t da = make_smem_desc(wg_smem + a_off, 16, sbo, Swizzle::b128);
  const uint64_t db = make_smem_desc(wg_smem + b_off, 16, sbo, Swizzle::b128);
  wgmma_m64n128k32_e4m3(acc1, da, db, 1);
  wgmma_commit();
  wgmma_m64n128k32_e4m3(acc2, da, db, 1);
  wgmma_commit();
  wgmma_wait<1>();
  store_d<128>(D, acc1);
  store_d<128>(D + 64 * 128, acc2);
  wgmma_wait<0>();
  store_d<128>(D + 2 * 64 * 128, acc2);
}
