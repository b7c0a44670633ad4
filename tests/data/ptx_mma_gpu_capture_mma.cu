// The mma harness of tests/test_ptx_mma.py as it ran on the H200 for ptx_mma_gpu_capture.npz
// (commit 47756b9, HEADERS of tests/test_ptx_support.py + SOURCE); kept verbatim so the replay
// runs the very kernels that produced the stored outputs.

#include "ptx/common.cuh"
#include "ptx/mma.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ld_st.cuh"
#include "ptx/barrier.cuh"
using namespace fmo::ptx;

template <typename E, int K, typename Mma>
__device__ void mma_from_global(const E* A, const E* B, const float* C, float* D, int ksteps, Mma mma) {
  constexpr int per = 4 / sizeof(E);  // elements per .b32 register
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3, KK = K * ksteps;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)];
  for (int s = 0; s < ksteps; ++s) {
    uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    for (int i = 0; i < 4 * per; ++i) {  // ISA fragment map of A
      const int row = per == 2 ? g + 8 * ((i / 2) % 2) : g + 8 * ((i / 4) % 2);
      const int col = per == 2 ? 2 * t + (i % 2) + 8 * (i >= 4) : 4 * t + (i % 4) + 16 * (i >= 8);
      a[i / per] |= uint32_t(A[row * KK + K * s + col]) << (8 * sizeof(E) * (i % per));
    }
    for (int i = 0; i < 2 * per; ++i) {  // ISA fragment map of B
      const int k = per == 2 ? 2 * t + (i % 2) + 8 * (i >= 2) : 4 * t + (i % 4) + 16 * (i >= 4);
      b[i / per] |= uint32_t(B[(K * s + k) * 8 + g]) << (8 * sizeof(E) * (i % per));
    }
    mma(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}

#define MMA_KERNEL(NAME, E, K, FN)                                                       \
  extern "C" __global__ void NAME(const E* A, const E* B, const float* C, float* D, int ksteps) { \
    mma_from_global<E, K>(A, B, C, D, ksteps,                                            \
        [](float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) { \
          FN(d, a, b, c); });                                                            \
  }
MMA_KERNEL(mma_bf16, uint16_t, 16, mma_m16n8k16_bf16)
MMA_KERNEL(mma_f16, uint16_t, 16, mma_m16n8k16_f16)
MMA_KERNEL(mma_e4m3, uint8_t, 32, mma_m16n8k32_e4m3)
MMA_KERNEL(mma_e5m2, uint8_t, 32, mma_m16n8k32_e5m2)

// 16-bit inputs through ldmatrix: A [16][16] and B^T [8][16] (n, k) staged in shared memory
// with a 48-byte row pitch (rows stay 16-byte aligned, not contiguous); ldmatrix.x4 gives
// A's fragment, ldmatrix.x2 of B^T (= B column-major) gives B's.
extern __shared__ __align__(16) unsigned char smem[];

template <bool BF16>
__device__ void mma_ldmatrix(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  constexpr int pitch = 48;
  unsigned char* sa = smem;
  unsigned char* sb = smem + 16 * pitch;
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 16 * 16; i += 32) memcpy(sa + (i / 16) * pitch + 2 * (i % 16), A + i, 2);
  for (int i = lane; i < 8 * 16; i += 32) memcpy(sb + (i / 16) * pitch + 2 * (i % 16), Bt + i, 2);
  __syncthreads();
  // x4 matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
  const int m = lane / 8, r = lane % 8;
  uint32_t a[4], b[2];
  ldmatrix_x4(a, sa + ((m % 2) * 8 + r) * pitch + (m / 2) * 16);
  // x2 matrices: (n 0-7, k 0-7), (n 0-7, k 8-15); lanes 16-31 repeat valid addresses
  ldmatrix_x2(b, sb + r * pitch + (m % 2) * 16);
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)];
  if (BF16) mma_m16n8k16_bf16(acc, a, b, acc); else mma_m16n8k16_f16(acc, a, b, acc);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >= 2)) * 8 + 2 * t + (i % 2)] = acc[i];
}
extern "C" __global__ void mma_ldm_bf16(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  mma_ldmatrix<true>(A, Bt, C, D);
}
extern "C" __global__ void mma_ldm_f16(const uint16_t* A, const uint16_t* Bt, const float* C, float* D) {
  mma_ldmatrix<false>(A, Bt, C, D);
}
