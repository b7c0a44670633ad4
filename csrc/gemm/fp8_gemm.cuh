// FP8 GEMM with DeepSeek's fine-grained scaling on mma.sync (sm_89 / sm_90):
//
//   out[m, n] = out_dtype( sum_kb a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                                  sum_{k in kb} a[m, k] * b[n, k] )
// a: [M, K] e4m3 (activations, 1 x 128 groups), b: [N, K] e4m3 (weights, 128 x 128 blocks
// when B_SCALE_ROWS = 128; 1 x 128 groups when B_SCALE_ROWS = 1, the wgrad layout). Both
// K-major ("NT"), which is the only layout mma.sync e4m3 takes (no transposed 8-bit ldmatrix).
//
// Problem views (MODE), sharing one mainloop (csrc/gemm/fp8_gemm_mainloop.cuh):
//   kDense       one problem.
//   kContiguous  a [M, K] holds G groups' rows back to back; m_indices[m] names row m's group
//                (b[g] = [N, K]); -1 marks padding rows, whose output rows are 0. Groups start
//                at multiples of contiguous_alignment() (128, a multiple of every BM) and pad
//                at their end, so a BM-row tile lies in one group's segment and its group is
//                m_indices[m0] (the launcher's debug mode checks this layout).
//                A group index outside [-1, G) makes the tile's rows NaN (never a wild read;
//                the launcher's debug mode names the bad row).
//   kMasked      a [G, Mmax, K], grid.z = G; rows >= masked_m[g] are neither read nor written.
// Roles: one CTA per output tile (TileScheduler; the sm_90a kernel, fp8_gemm_wgmma.cuh, has the
// persistent, SM-budget-aware one and shares resolve_tile and the row policy); every warp
// computes and loads.
// Epilogue: fp32 -> out_dtype staged through the (then idle) pipeline smem, written out in
// coalesced 16-byte row chunks. Shared memory: the mainloop's
// STAGES * (128 (BM + BN) + 4 (BM + B_SCALES)) bytes, which also holds the BM x (BN + 16 B) tile.
// Constraints: K % 16 == 0 (launcher), contiguous operands.
#pragma once

#include "csrc/common/types.cuh"
#include "csrc/gemm/fp8_gemm_mainloop.cuh"

// Dynamic shared memory (the pipeline's stages). C linkage at file scope: one plain symbol,
// which the simulator aliases to its dynamic buffer like any `extern __shared__` array.
extern "C" {
// 1024-aligned: the wgmma kernel's 128B-swizzled tiles must sit at multiples of 1024 bytes.
extern __shared__ __align__(1024) uint8_t fmo_fp8_gemm_smem[];
}

namespace fmo {

struct Fp8GemmParams {
    const void* a;            // [M, K] e4m3 (masked: [G, Mmax, K])
    const float* a_scale;     // [M, k_blocks] fp32 (masked: [G, Mmax, k_blocks])
    const void* b;            // [N, K] e4m3 (grouped: [G, N, K])
    const float* b_scale;     // [b_scale_rows, k_blocks] fp32 (grouped: [G, ...])
    void* out;                // [M, N] out_dtype (masked: [G, Mmax, N])
    const int32_t* m_indices; // contiguous: [M]
    const int32_t* masked_m;  // masked: [G]
    int64_t m;                // rows of a (masked: Mmax)
    int64_t n;
    int64_t k;
    int64_t k_blocks;         // ceil(K / 128)
    int64_t b_scale_rows;     // ceil(N / B_SCALE_ROWS)
    int64_t num_groups;
};

namespace gemm {

enum Mode : int { kDense = 0, kContiguous = 1, kMasked = 2 };

struct Tile {
    int64_t m0, n0, group;
};

// One CTA per tile: grid = (ceil(N / BN), ceil(M / BM), groups).
struct TileScheduler {
    template <class Shape>
    FMO_DEVICE static Tile tile() {
        return Tile{int64_t(blockIdx.y) * Shape::BM, int64_t(blockIdx.x) * Shape::BN, int64_t(blockIdx.z)};
    }
};

enum class TileKind { kCompute, kSkip, kInvalidGroup };

template <int MODE, class Shape>
FMO_DEVICE TileKind resolve_tile(const Fp8GemmParams& p, const Tile& tile, TileOperands& t) {
    const auto* a = static_cast<const uint8_t*>(p.a);
    const auto* b = static_cast<const uint8_t*>(p.b);
    int64_t group = 0, rows = p.m;
    TileKind kind = TileKind::kCompute;
    if (MODE == kContiguous) {
        group = p.m_indices[tile.m0];
        if (group < 0 || group >= p.num_groups) {
            kind = group == -1 ? TileKind::kCompute : TileKind::kInvalidGroup;
            group = 0;
        }
    } else if (MODE == kMasked) {
        group = tile.group;
        rows = p.masked_m[group] < p.m ? p.masked_m[group] : p.m;
        if (tile.m0 >= rows) kind = TileKind::kSkip;
        a += group * p.m * p.k;
    }
    t.a_row = (MODE == kMasked ? group * p.m : 0) + tile.m0;
    t.b_row = group * p.n + tile.n0;
    t.a = a + tile.m0 * p.k;
    t.a_scale = p.a_scale + (MODE == kMasked ? group * p.m * p.k_blocks : 0) + tile.m0 * p.k_blocks;
    t.b = b + (group * p.n + tile.n0) * p.k;
    t.b_scale = p.b_scale + group * p.b_scale_rows * p.k_blocks;
    t.rows_a = rows - tile.m0;
    t.rows_b = p.n - tile.n0;
    t.n0 = tile.n0;
    t.k = p.k;
    // A padding tile (m_indices[m0] == -1) or a bad group runs no K blocks.
    const bool padding = MODE == kContiguous && p.m_indices[tile.m0] < 0;
    t.k_blocks = (kind == TileKind::kCompute && !padding) ? p.k_blocks : 0;
    return kind;
}

// Epilogue, through shared memory (the pipeline's, free once the mainloop is done):
// (1) each warp writes its fp32 fragments, converted to OutT and with the row policy applied
//     (contiguous padding rows 0, a bad group NaN), into a BM x BN staging tile whose rows
//     are padded by 16 bytes (a fragment store's 8 rows then hit different banks);
// (2) the CTA copies the tile out in 16-byte row chunks, coalesced; ragged columns, or rows
//     not 16-byte aligned in global memory, fall back to element stores.
// Fragment c_i of MMA tile (mi, ni) sits at row g + 8 (i >= 2), column 2t + (i % 2).
template <int MODE, class Shape, typename OutT>
FMO_DEVICE void epilogue(const Fp8GemmParams& p, const Tile& tile, const TileOperands& t,
                         const float (&acc)[Shape::MI][Shape::NI][4], bool nan_rows, uint8_t* smem) {
    constexpr int kVec = 16 / sizeof(OutT);
    constexpr int kRowElems = Shape::BN + kVec;  // + 16 bytes
    static_assert(Shape::BM * kRowElems * sizeof(OutT) <= Shape::kSmemBytes, "the staging tile must fit the pipeline's smem");
    static_assert(Shape::BN % kVec == 0, "whole 16-byte chunks per staging row");
    OutT* stage = reinterpret_cast<OutT*>(smem);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int warp_m = warp / Shape::WARPS_N, warp_n = warp % Shape::WARPS_N;
    const int g = lane / 4, tq = lane % 4;

    __syncthreads();  // every warp is done reading the last stage: the smem is reused here
#pragma unroll
    for (int mi = 0; mi < Shape::MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * Shape::WM + mi * 16 + g + 8 * h;
            const bool zero = MODE == kContiguous && r < t.rows_a && p.m_indices[tile.m0 + r] < 0;
#pragma unroll
            for (int ni = 0; ni < Shape::NI; ++ni) {
                const int c = warp_n * Shape::WN + ni * 8 + 2 * tq;
                float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
                if (zero) v0 = v1 = 0.0f;
                if (nan_rows) v0 = v1 = __int_as_float(0x7fc00000);
                OutT* dst = stage + r * kRowElems + c;  // c even, kRowElems even: pair-aligned
                if constexpr (sizeof(OutT) == 2) {
                    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
                } else {
                    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
                }
            }
        }
    __syncthreads();

    OutT* out = static_cast<OutT*>(p.out) + (MODE == kMasked ? tile.group * p.m * p.n : 0);
    const bool rows_aligned = p.n % kVec == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0;
    constexpr int kChunks = Shape::BN / kVec;
    for (int i = threadIdx.x; i < Shape::BM * kChunks; i += Shape::kThreads) {
        const int r = i / kChunks, c = (i % kChunks) * kVec;
        if (r >= t.rows_a || c >= t.rows_b) continue;
        const OutT* src = stage + r * kRowElems + c;
        OutT* dst = out + (tile.m0 + r) * p.n + tile.n0 + c;
        if (rows_aligned && c + kVec <= t.rows_b) {
            store_vec<OutT, kVec>(dst, load_vec<OutT, kVec>(src));
        } else {
            for (int j = 0; j < kVec && c + j < t.rows_b; ++j) dst[j] = src[j];
        }
    }
}

}  // namespace gemm

template <int MODE, int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, int B_SCALE_ROWS, typename OutT>
__device__ __forceinline__ void fp8_gemm(const Fp8GemmParams& p) {
    using Shape = gemm::MainloopShape<BM, BN, WARPS_M, WARPS_N, STAGES, B_SCALE_ROWS>;
    static_assert(sizeof(OutT) == 2 || sizeof(OutT) == 4, "out: bf16 or fp32");

    const gemm::Tile tile = gemm::TileScheduler::tile<Shape>();
    gemm::TileOperands t;
    const gemm::TileKind kind = gemm::resolve_tile<MODE, Shape>(p, tile, t);
    if (kind == gemm::TileKind::kSkip) return;  // whole CTA: masked rows past masked_m[g]

    float acc[Shape::MI][Shape::NI][4];
#pragma unroll
    for (int mi = 0; mi < Shape::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Shape::NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
    gemm::Mainloop<Shape>{fmo_fp8_gemm_smem}.run(t, acc);
    gemm::epilogue<MODE, Shape, OutT>(p, tile, t, acc, kind == gemm::TileKind::kInvalidGroup, fmo_fp8_gemm_smem);
}

}  // namespace fmo
