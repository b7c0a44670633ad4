// Mainloop of the mma.sync FP8 GEMM with DeepSeek's fine-grained scaling (sm_89+): one
// BM x BN output tile, K walked in 128-wide blocks (the scale block), STAGES-deep cp.async
// pipeline, ldmatrix fragments, mma.m16n8k32.e4m3 into a per-K-block fp32 partial sum that
// is promoted into the fp32 accumulator with a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb].
//
//   acc[m, n] = sum_kb  a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                       (sum_{k in block kb} a[m, k] * b[n, k])        (inner sum: fp32 MMA)
//
// Roles: WARPS_M x WARPS_N warps, each owning a (BM/WARPS_M) x (BN/WARPS_N) sub-tile as
// MI x NI m16n8 MMA tiles; every thread also issues cp.async for its share of the next stage.
// Shared memory per stage: A [BM][128] + B [BN][128] e4m3 (16-byte chunks XOR-swizzled by
// row % 8, so the 8 rows an ldmatrix phase reads hit 8 different bank groups), then
// a-scales [BM] + b-scales [B_SCALES] fp32:
//   smem = STAGES * (128 * (BM + BN) + 4 * (BM + B_SCALES)) bytes.
// Out-of-range rows and the K tail are zero-filled by cp.async (src-size 0), so they add 0.
// Constraint (the launcher refuses otherwise): K % 16 == 0, so that every 16-byte chunk of
// a row is either wholly inside K or wholly past it, and rows start 16-byte aligned.
#pragma once

#include "ptx/cp_async.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/mma.cuh"

namespace fmo {
namespace gemm {

constexpr int kBlockK = 128;          // the scale block along K: one promotion per block
constexpr int kChunks = kBlockK / 16; // 16-byte chunks per smem row

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int B_SCALE_ROWS_>
struct MainloopShape {
    static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int B_SCALE_ROWS = B_SCALE_ROWS_;
    static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
    static constexpr int MI = WM / 16, NI = WN / 8;
    // One b-scale per tile when the tile never straddles a scale block (weights, 128 rows);
    // one per column when b is scaled per row (wgrad's 1 x 128 groups).
    static constexpr bool kTileBScale = B_SCALE_ROWS % BN == 0;
    static constexpr int B_SCALES = kTileBScale ? 1 : BN;
    static constexpr int kTileBytes = kBlockK * (BM + BN);
    static constexpr int kScaleBytes = 4 * (BM + B_SCALES);
    static constexpr int kSmemBytes = STAGES * (kTileBytes + kScaleBytes);
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: multiples of 16 rows and 16 columns (ldmatrix.x4 feeds two n8 tiles)");
    static_assert(B_SCALE_ROWS == 1 || kTileBScale, "b scales: per row, or per block of a multiple of BN rows");
    static_assert(STAGES >= 2, "the pipeline needs at least two stages");
    static_assert((BM * kChunks) % kThreads == 0 && (BN * kChunks) % kThreads == 0, "loads split evenly over the threads");
    static_assert(BM <= kThreads && B_SCALES <= kThreads, "one scale per thread per stage");
};

// Operands of one tile, resolved by the problem view (dense / grouped) before the mainloop.
struct TileOperands {
    const uint8_t* a;        // row m0 of A, [rows_a, K] e4m3
    const float* a_scale;    // row m0 of the a scales, [rows_a, k_blocks]
    const uint8_t* b;        // row n0 of B, [rows_b, K] e4m3
    const float* b_scale;    // the b scales of this group, [ceil(N / B_SCALE_ROWS), k_blocks]
    int64_t rows_a;          // valid A rows from m0 (<= 0: none)
    int64_t rows_b;          // valid B rows from n0
    int64_t n0;              // first column (for the b-scale row)
    int64_t k;
    int64_t k_blocks;        // K blocks to run (0: the accumulator stays 0)
    int64_t a_row, b_row;    // the tile's first row in A and B viewed as [rows, K] (the TMA maps' y)
};

// Also, with the tile at a multiple of 1024 bytes, wgmma's 128-byte-swizzle K-major layout
// (ptx/wgmma.cuh): the Hopper kernel's descriptors depend on this exact formula
// (tests/test_ptx_wgmma.py::test_layout_model_b128_is_the_gemm_swizzle).
FMO_DEVICE int swizzle(int row, int chunk) { return row * kBlockK + ((chunk ^ (row % 8)) * 16); }

template <class Shape>
struct Mainloop {
    static constexpr int MI = Shape::MI, NI = Shape::NI;

    uint8_t* smem;

    FMO_DEVICE uint8_t* tile_a(int stage) const { return smem + stage * Shape::kTileBytes; }
    FMO_DEVICE uint8_t* tile_b(int stage) const { return tile_a(stage) + kBlockK * Shape::BM; }
    FMO_DEVICE float* scales_a(int stage) const {
        return reinterpret_cast<float*>(smem + Shape::STAGES * Shape::kTileBytes + stage * Shape::kScaleBytes);
    }
    FMO_DEVICE float* scales_b(int stage) const { return scales_a(stage) + Shape::BM; }

    // Issue (without committing) the cp.async of K block kb into `stage`.
    FMO_DEVICE void load_stage(const TileOperands& t, int stage, int64_t kb) const {
        const int tid = threadIdx.x;
#pragma unroll
        for (int i = 0; i < Shape::BM * kChunks / Shape::kThreads; ++i) {
            const int c = i * Shape::kThreads + tid, row = c / kChunks, chunk = c % kChunks;
            const int64_t col = kb * kBlockK + chunk * 16;
            const bool ok = row < t.rows_a && col < t.k;
            // Zero-filled chunks still name a valid address (the tile's first byte).
            ptx::cp_async_cg16(tile_a(stage) + swizzle(row, chunk), ok ? t.a + row * t.k + col : t.a, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < Shape::BN * kChunks / Shape::kThreads; ++i) {
            const int c = i * Shape::kThreads + tid, row = c / kChunks, chunk = c % kChunks;
            const int64_t col = kb * kBlockK + chunk * 16;
            const bool ok = row < t.rows_b && col < t.k;
            ptx::cp_async_cg16(tile_b(stage) + swizzle(row, chunk), ok ? t.b + row * t.k + col : t.b, ok ? 16 : 0);
        }
        if (tid < Shape::BM) {
            const bool ok = tid < t.rows_a;
            ptx::cp_async_ca<4>(scales_a(stage) + tid, t.a_scale + (ok ? tid * t.k_blocks + kb : 0), ok ? 4 : 0);
        }
        if (tid < Shape::B_SCALES) {
            const bool ok = tid < t.rows_b;
            const int64_t brow = (t.n0 + tid) / Shape::B_SCALE_ROWS;
            ptx::cp_async_ca<4>(scales_b(stage) + tid, t.b_scale + (ok ? brow * t.k_blocks + kb : 0), ok ? 4 : 0);
        }
    }

    // One K block of MMAs on `stage` into `partial` (zeroed here).
    FMO_DEVICE void mma_stage(int stage, int warp_m, int warp_n, float (&partial)[MI][NI][4]) const {
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int r = 0; r < 4; ++r) partial[mi][ni][r] = 0.0f;
        // Not unrolled: one k32 step's fragments live at a time (unrolling all four hoists every
        // fragment and its f16 unpack on sm_90 and costs ~100 registers).
#pragma unroll 1
        for (int ks = 0; ks < kBlockK / 32; ++ks) {
            uint32_t bf[NI][2];
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                // x4: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31).
                const int row = warp_n * Shape::WN + nj * 16 + lane % 8 + 8 * (lane / 16);
                uint32_t r[4];
                ptx::ldmatrix_x4(r, tile_b(stage) + swizzle(row, 2 * ks + (lane / 8) % 2));
                bf[2 * nj][0] = r[0];
                bf[2 * nj][1] = r[1];
                bf[2 * nj + 1][0] = r[2];
                bf[2 * nj + 1][1] = r[3];
            }
            // A one m16 row-tile at a time: only one A fragment (and, on sm_90, its f16
            // unpack) is live, against all of B's.
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                // x4: matrices (rows 0-7 | 8-15) x (k bytes 0-15 | 16-31) = the 8-bit A fragment.
                const int row = warp_m * Shape::WM + mi * 16 + lane % 8 + 8 * ((lane / 8) % 2);
                uint32_t af[4];
                ptx::ldmatrix_x4(af, tile_a(stage) + swizzle(row, 2 * ks + lane / 16));
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) ptx::mma_m16n8k32_e4m3(partial[mi][ni], af, bf[ni], partial[mi][ni]);
            }
        }
    }

    // acc += partial * a_scale[row] * b_scale[col]: DeepSeek's per-128-K promotion in fp32.
    FMO_DEVICE void promote(int stage, int warp_m, int warp_n, const float (&partial)[MI][NI][4],
                            float (&acc)[MI][NI][4]) const {
        const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
        const float* sa = scales_a(stage);
        const float* sb = scales_b(stage);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float a_s = sa[warp_m * Shape::WM + mi * 16 + g + 8 * h];
#pragma unroll
                for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const float b_s = Shape::kTileBScale ? sb[0] : sb[warp_n * Shape::WN + ni * 8 + 2 * t + c];
                        acc[mi][ni][2 * h + c] = fmaf(partial[mi][ni][2 * h + c], a_s * b_s, acc[mi][ni][2 * h + c]);
                    }
            }
    }

    // The whole K loop of one tile. acc must be zeroed by the caller.
    FMO_DEVICE void run(const TileOperands& t, float (&acc)[MI][NI][4]) const {
        const int warp = threadIdx.x / 32, warp_m = warp / Shape::WARPS_N, warp_n = warp % Shape::WARPS_N;
        // Prologue: STAGES-1 K blocks in flight (empty groups past the end keep the count uniform).
#pragma unroll
        for (int s = 0; s < Shape::STAGES - 1; ++s) {
            if (s < t.k_blocks) load_stage(t, s, s);
            ptx::cp_async_commit();
        }
        float partial[MI][NI][4];
        for (int64_t kb = 0; kb < t.k_blocks; ++kb) {
            ptx::cp_async_wait<Shape::STAGES - 2>();  // this thread's copies of block kb landed
            __syncthreads();  // everyone's copies landed, and everyone is done with block kb-1
            const int64_t next = kb + Shape::STAGES - 1;
            if (next < t.k_blocks) load_stage(t, int(next % Shape::STAGES), next);  // refills kb-1's stage
            ptx::cp_async_commit();
            const int stage = int(kb % Shape::STAGES);
            mma_stage(stage, warp_m, warp_n, partial);
            promote(stage, warp_m, warp_n, partial, acc);
        }
        ptx::cp_async_wait_all();  // nothing may still land in shared memory after the tile
    }
};

}  // namespace gemm
}  // namespace fmo
