// FP8 (e4m3) quantisation per BLOCK x BLOCK block (DeepSeek-V3's weight recipe).
//
// Computes, for w [rows, cols] (bf16/fp16/fp32, row stride w_row_stride elements):
//   ws[i, j] = scale(amax_finite(w[i*BLOCK : (i+1)*BLOCK, j*BLOCK : (j+1)*BLOCK]))  (fp32)
//   wq[r, c] = q(w[r, c], ws[r / BLOCK, c / BLOCK])                               (contiguous)
// with scale() and q() of the contract in csrc/quant/fp8_scale.cuh (the same as the
// per-token-group kernel's): amax ignores NaN/+-inf, min_amax floors an all-zero block,
// POW2 = UE8M0 scales.
// Blocks at the right/bottom edge are partial; their scale covers the elements present.
// The block quantisation of w^T is the transpose of that of w (same elements, same
// blocks), so the backward's transposed weight is wq.t() with ws.t(): no second kernel.
//
// Roles: one CTA of THREADS = min(256, BLOCK*BLOCK/VEC) threads per block. A row of the
// block is BLOCK/VEC threads wide (one VEC-element access each: 16 bytes when VEC*sizeof(T)
// == 16); the CTA covers THREADS/(BLOCK/VEC) rows per pass and BLOCK of them in PASSES
// passes, keeping its ELEMS = BLOCK*BLOCK/THREADS values in registers. amax: xor-shuffles
// in each warp, then one float per warp through shared memory. One pass over w.
// Shared memory: THREADS/32 floats. Constraints: BLOCK a power of two in [32, 128];
// cols % VEC == 0, w_row_stride % VEC == 0 and w 16-byte aligned when VEC > 1.
#pragma once

#include "csrc/quant/fp8_scale.cuh"

namespace fmo {

struct Fp8BlockQuantParams {
    const void* w;         // [rows, cols] T, row stride w_row_stride elements
    void* wq;              // [rows, cols] __nv_fp8_e4m3, contiguous
    float* ws;             // [ceil(rows/BLOCK), ceil(cols/BLOCK)] fp32, contiguous
    int64_t rows;
    int64_t cols;
    int64_t w_row_stride;
    float min_amax;
    int32_t reserved;      // keeps the struct's size a multiple of 8 on every compiler
};

template <int BLOCK, int VEC>
struct BlockQuantShape {
    static constexpr int kThreads = (BLOCK * BLOCK / VEC) < 256 ? (BLOCK * BLOCK / VEC) : 256;
    static constexpr int kRowThreads = BLOCK / VEC;
    static constexpr int kRowsPerPass = kThreads / kRowThreads;
    static constexpr int kPasses = BLOCK / kRowsPerPass;
    static_assert(BLOCK >= 32 && BLOCK <= 128 && (BLOCK & (BLOCK - 1)) == 0, "BLOCK: a power of two in [32, 128]");
    static_assert(kThreads % 32 == 0 && kRowsPerPass * kRowThreads == kThreads && kPasses * kRowsPerPass == BLOCK,
                  "the CTA must tile the block in whole rows and passes");
};

template <typename T, int BLOCK, int VEC, bool POW2>
__device__ __forceinline__ void fp8_quant_block(const Fp8BlockQuantParams& p) {
    using S = BlockQuantShape<BLOCK, VEC>;
    __shared__ float warp_amax[S::kThreads / 32];

    const int64_t row0 = int64_t(blockIdx.y) * BLOCK;
    const int64_t col = int64_t(blockIdx.x) * BLOCK + (threadIdx.x % S::kRowThreads) * VEC;
    const int sub_row = threadIdx.x / S::kRowThreads;
    const T* w = static_cast<const T*>(p.w);

    float vals[S::kPasses][VEC];  // this thread's ELEMS values
    float amax = 0.0f;
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
        const int64_t row = row0 + pass * S::kRowsPerPass + sub_row;
        if (row < p.rows && col < p.cols) {  // VEC > 1 implies cols % VEC == 0: all or none
            const Vec<T, VEC> v = load_vec<T, VEC>(w + row * p.w_row_stride + col);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                vals[pass][i] = to_float(v.v[i]);
                amax = fold_finite_amax(amax, vals[pass][i]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) vals[pass][i] = 0.0f;
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < S::kThreads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
    const float scale = fp8_scale_from_amax<POW2>(amax, p.min_amax);

    __nv_fp8_storage_t* wq = static_cast<__nv_fp8_storage_t*>(p.wq);
#pragma unroll
    for (int pass = 0; pass < S::kPasses; ++pass) {
        const int64_t row = row0 + pass * S::kRowsPerPass + sub_row;
        if (row < p.rows && col < p.cols) {
            Vec<__nv_fp8_storage_t, VEC> q;
#pragma unroll
            for (int i = 0; i < VEC; ++i) q.v[i] = fp8_quantize(vals[pass][i], scale);
            store_vec<__nv_fp8_storage_t, VEC>(wq + row * p.cols + col, q);
        }
    }
    if (threadIdx.x == 0) p.ws[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = scale;
}

}  // namespace fmo
