// FP8 (e4m3) quantisation of x^T per 1 x GROUP group along x's rows: the wgrad operands
// (dW = dy^T x reduces over tokens, so dy^T and x^T are quantised along the token axis).
//
// For x [rows, cols] (bf16/fp16/fp32, row stride x_row_stride elements), with g = r / GROUP:
//   xs_t[c, g]  = scale(amax_finite(x[g*GROUP : (g+1)*GROUP, c]))            fp32 [cols, groups]
//   xq_t[c, r]  = q(x[r, c], xs_t[c, g])                    for r < rows       e4m3 [cols, out_cols]
//   xq_t[c, r]  = 0                                         for rows <= r < out_cols
// out_cols = rows rounded up to 16 (the consuming GEMM's K must be a multiple of 16). scale()
// and q(): the contract in csrc/quant/fp8_scale.cuh, as the per-token-group kernel's, so the result
// equals quantize_per_token_group(x^T) bit for bit, without materialising x^T.
//
// Roles: one CTA (256 threads) per GROUP x TILE_C tile of x. (1) coalesced, vectorised loads
// along cols into shared memory (fp32, rows padded by one float so column walks spread over
// banks); (2) four threads per column reduce its amax (xor-shuffles), one writes the scale;
// (3) each thread packs 16 consecutive rows of one column into one 16-byte store of xq_t.
// Shared memory: GROUP * (TILE_C + 1) * 4 + TILE_C * 4 bytes (128 x 64: 33,536 B).
// Constraints: GROUP a multiple of 16 and <= 128, out_cols % 16 == 0 (xq_t rows 16-byte
// aligned); cols % VEC == 0, x_row_stride % VEC == 0 and x 16-byte aligned when VEC > 1
// (the launcher picks VEC = 1 otherwise).
#pragma once

#include "csrc/quant/fp8_scale.cuh"

namespace fmo {

struct Fp8TransposedQuantParams {
    const void* x;         // [rows, cols] T, row stride x_row_stride elements
    void* xq_t;            // [cols, out_cols] __nv_fp8_e4m3, contiguous
    float* xs_t;           // [cols, groups] fp32, contiguous
    int64_t rows;
    int64_t cols;
    int64_t x_row_stride;
    int64_t out_cols;      // rows rounded up to a multiple of 16
    int64_t groups;        // ceil(rows / GROUP)
    float min_amax;
    int32_t reserved;
};

template <typename T, int GROUP, int TILE_C, int VEC, bool POW2>
__device__ __forceinline__ void fp8_quant_token_group_transposed(const Fp8TransposedQuantParams& p) {
    constexpr int kThreads = 256;
    constexpr int kPerCol = kThreads / TILE_C;  // threads reducing one column
    static_assert(GROUP % 16 == 0 && GROUP <= 128, "GROUP: a multiple of 16, at most 128");
    static_assert(kThreads % TILE_C == 0 && (kPerCol & (kPerCol - 1)) == 0 && kPerCol <= 32 && GROUP % kPerCol == 0,
                  "TILE_C must split 256 threads into power-of-two teams per column");
    static_assert((TILE_C * GROUP / 16) % kThreads == 0, "whole 16-byte stores per thread");
    static_assert(TILE_C % VEC == 0, "whole vectors per tile row");
    __shared__ float tile[GROUP][TILE_C + 1];
    __shared__ float scales[TILE_C];

    const int64_t r0 = int64_t(blockIdx.y) * GROUP;
    const int64_t c0 = int64_t(blockIdx.x) * TILE_C;
    const T* x = static_cast<const T*>(p.x);

    // (1) load: consecutive threads read consecutive VEC-element pieces of one row (one
    // 16-byte access each when VEC * sizeof(T) == 16).
    constexpr int kRowVecs = TILE_C / VEC;
    for (int i = threadIdx.x; i < GROUP * kRowVecs; i += kThreads) {
        const int r = i / kRowVecs, c = (i % kRowVecs) * VEC;
        const int64_t gr = r0 + r, gc = c0 + c;
        if (gr < p.rows && gc < p.cols) {  // VEC > 1 implies cols % VEC == 0: all or none
            const Vec<T, VEC> v = load_vec<T, VEC>(x + gr * p.x_row_stride + gc);
#pragma unroll
            for (int j = 0; j < VEC; ++j) tile[r][c + j] = to_float(v.v[j]);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) tile[r][c + j] = 0.0f;
        }
    }
    __syncthreads();

    // (2) amax per column: kPerCol adjacent lanes share a column, GROUP / kPerCol rows each.
    {
        const int c = threadIdx.x / kPerCol, part = threadIdx.x % kPerCol;
        float amax = 0.0f;
        for (int r = part; r < GROUP; r += kPerCol) amax = fold_finite_amax(amax, tile[r][c]);
#pragma unroll
        for (int offset = kPerCol / 2; offset > 0; offset /= 2)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        const float scale = fp8_scale_from_amax<POW2>(amax, p.min_amax);
        if (part == 0) {
            scales[c] = scale;
            if (c0 + c < p.cols) p.xs_t[(c0 + c) * p.groups + blockIdx.y] = scale;
        }
    }
    __syncthreads();

    // (3) quantise + store: chunk = 16 consecutive rows of one column -> 16 bytes of xq_t.
    auto* xq_t = static_cast<__nv_fp8_storage_t*>(p.xq_t);
    constexpr int kChunksPerCol = GROUP / 16;
#pragma unroll
    for (int i = 0; i < TILE_C * kChunksPerCol / kThreads; ++i) {
        const int chunk = i * kThreads + threadIdx.x;
        const int c = chunk / kChunksPerCol, rr = (chunk % kChunksPerCol) * 16;
        const int64_t gc = c0 + c, gr = r0 + rr;
        if (gc >= p.cols || gr >= p.out_cols) continue;
        Vec<__nv_fp8_storage_t, 16> q;
#pragma unroll
        for (int j = 0; j < 16; ++j) q.v[j] = fp8_quantize(tile[rr + j][c], scales[c]);  // padding rows: 0 / s = 0
        store_vec<__nv_fp8_storage_t, 16>(xq_t + gc * p.out_cols + gr, q);
    }
}

}  // namespace fmo
