// FP8 GEMM with DeepSeek's fine-grained scaling on Hopper (sm_90a): persistent, warp-
// specialised, TMA + mbarrier ring, wgmma (QGMMA in SASS).
//
//   out[m, n] = out_dtype( sum_kb a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                                  sum_{k in kb} a[m, k] * b[n, k] )
// Same operands, problem views (kDense / kContiguous / kMasked, resolve_tile) and row policy
// as the mma.sync kernel (csrc/gemm/fp8_gemm.cuh, whose header comment defines them); A and B
// reach the kernel as TMA tensor maps (Fp8GemmWsParams) of their [rows, K] views.
//
//   CTA (persistent: grid = min(tiles, SM budget); every role walks the same tile sequence,
//        csrc/gemm/fp8_gemm_ws_scheduler.cuh)
//   warpgroup 0  producer: setmaxnreg.dec 40; warp 0's elected lane issues the TMA loads of
//                each tile's K blocks into the ring (produce_tile); warps 1-3 exit.
//   warpgroup 1+ math (BM / 64 of them, 64 rows each): setmaxnreg.inc 232 (248 when one); per tile the K
//                loop (WsMainloop: wgmma back to back, promotion of block kb-1 while block
//                kb's MMAs run, empty[s] released once the MMAs reading s retired), then the
//                epilogue.
//   ring         STAGES x { A box [BM][128], B box [BN][128] } e4m3 (128B swizzle),
//                full[s] (1 arrival + 128 (BM + BN) transaction bytes), empty[s] (one arrival
//                per math warp): fp8_gemm_wgmma_mainloop.cuh.
//
// Epilogue: registers straight to global memory (4- or 8-byte column pairs per thread, the
// mma.sync C layout), no shared-memory staging and no barrier between the math warpgroups.
// So the ring is never borrowed by the epilogue: the producer keeps loading the next tile's
// blocks while a warpgroup stores, and neither warpgroup waits for the other. A staged TMA
// store writes whole 128-byte lines instead of 32-byte sectors; whether that wins is for the
// GPU benchmark to say (bench/bench_fp8.py), not yet measured.
// Scales: plain loads by the math threads, not TMA (a_scale's per-tile column is 4 bytes
// wide, under TMA's 16-byte minimum): see fp8_gemm_wgmma_mainloop.cuh.
// Shared memory: STAGES * (128 (BM + BN) + 16) bytes.
// Constraints (the launcher refuses otherwise, before any launch): K % 16 == 0 (the maps'
// row stride is K bytes, which TMA wants a multiple of 16), 16-byte aligned A and B, contiguous
// operands. Ragged M, N and K are the maps' zero fill plus the epilogue's bounds.
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"
#include "csrc/gemm/fp8_gemm_wgmma_mainloop.cuh"
#include "csrc/gemm/fp8_gemm_ws_scheduler.cuh"
#include "ptx/warp.cuh"

namespace fmo {

struct Fp8GemmWsParams {
    Fp8GemmParams g;          // pointers (A and B also through the maps) and sizes
    ptx::TmaDescriptor a_map; // A as [rows, K] e4m3 (masked: G * Mmax rows), box 128 x BM, 128B swizzle
    ptx::TmaDescriptor b_map; // B as [G * N, K] e4m3, box 128 x BN, 128B swizzle
};

namespace gemm {

constexpr int kProducerRegs = 40;  // the producer lane needs addresses and a loop counter
// Math registers after setmaxnreg: 128 x 40 + 256 x 232 = 64512 of the SM's 65536 (BM = 128);
// one math warpgroup (BM = 64) may take up to 248 (fastmoe_ops/ops/fp8_gemm_config.py: MATH_REGS
// is the smaller, so the cost model's register check holds for both).
constexpr uint32_t kMathRegs2 = 232, kMathRegs1 = 248;  // two math warpgroups (BM = 128), one (BM = 64)

template <typename OutT>
FMO_DEVICE OutT from_float(float v) {
    if constexpr (sizeof(OutT) == 2) return __float2bfloat16(v); else return v;
}

// Registers -> global. Row policy as the mma.sync epilogue: contiguous padding rows (m_indices
// -1) are 0, a bad group's rows NaN, rows past the tile's valid rows and columns past N unwritten.
template <int MODE, class Shape, typename OutT>
FMO_DEVICE void store_tile(const Fp8GemmParams& p, const Tile& tile, const TileOperands& t, const float (&acc)[Shape::R],
                           bool nan_rows) {
    const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, tq = lane % 4;
    OutT* out = static_cast<OutT*>(p.out) + (MODE == kMasked ? tile.group * p.m * p.n : 0);
    const bool pairs = p.n % 2 == 0 && reinterpret_cast<unsigned long long>(p.out) % (2 * sizeof(OutT)) == 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = wg * kWarpgroupRows + warp * 16 + g + 8 * h;
        if (r >= t.rows_a) continue;
        const bool zero = MODE == kContiguous && p.m_indices[tile.m0 + r] < 0;
        OutT* row = out + (tile.m0 + r) * p.n + tile.n0;
#pragma unroll
        for (int ni = 0; ni < Shape::BN / 8; ++ni) {
            const int c = ni * 8 + 2 * tq;
            if (c >= t.rows_b) continue;
            float v0 = acc[4 * ni + 2 * h], v1 = acc[4 * ni + 2 * h + 1];
            if (zero) v0 = v1 = 0.0f;
            if (nan_rows) v0 = v1 = __int_as_float(0x7fc00000);
            if (pairs && c + 1 < t.rows_b) {  // n even: c + 1 < rows_b whenever c < rows_b
                if constexpr (sizeof(OutT) == 2)
                    *reinterpret_cast<__nv_bfloat162*>(row + c) = __floats2bfloat162_rn(v0, v1);
                else
                    *reinterpret_cast<float2*>(row + c) = make_float2(v0, v1);
            } else {
                row[c] = from_float<OutT>(v0);
                if (c + 1 < t.rows_b) row[c + 1] = from_float<OutT>(v1);
            }
        }
    }
}

}  // namespace gemm

template <int MODE, int BM, int BN, int STAGES, int B_SCALE_ROWS, typename OutT, bool UNSAFE_EARLY_RELEASE = false>
__device__ __forceinline__ void fp8_gemm_wgmma(const Fp8GemmWsParams& P) {
    using Shape = gemm::WsShape<BM, BN, STAGES, B_SCALE_ROWS>;
    static_assert(sizeof(OutT) == 2 || sizeof(OutT) == 4, "out: bf16 or fp32");
    const Fp8GemmParams& p = P.g;
    const gemm::Ring<Shape> ring{fmo_fp8_gemm_smem};
    if (threadIdx.x == 0) ring.init();
    __syncthreads();  // the barriers are initialised before any role uses them (the last CTA-wide barrier)

    gemm::WsScheduler<MODE, BM, BN, gemm::kRasterBandM> sched(p.m, p.n, p.num_groups, p.masked_m);
    PipelineState ps;
    gemm::Tile tile;
    if (threadIdx.x < 128) {  // producer warpgroup
        ptx::setmaxnreg_dec<gemm::kProducerRegs>();
        if (threadIdx.x / 32 == 0 && ptx::elect_one_sync()) {
            ptx::tma_prefetch_descriptor(&P.a_map);
            ptx::tma_prefetch_descriptor(&P.b_map);
            while (sched.next(tile)) {
                gemm::TileOperands t;
                gemm::resolve_tile<MODE, Shape>(p, tile, t);  // k_blocks 0 (padding, bad group): nothing to load
                gemm::produce_tile(ring, &P.a_map, &P.b_map, t, ps);
            }
        }
        return;
    }

    ptx::setmaxnreg_inc<(BM == 128 ? gemm::kMathRegs2 : gemm::kMathRegs1)>();
    const gemm::WsMainloop<Shape, UNSAFE_EARLY_RELEASE> mainloop{ring, &p};
    while (sched.next(tile)) {
        gemm::TileOperands t;
        const gemm::TileKind kind = gemm::resolve_tile<MODE, Shape>(p, tile, t);
        if (kind == gemm::TileKind::kSkip) continue;  // resolve_tile's contract; the scheduler already leaves those out
        float acc[Shape::R];
#pragma unroll
        for (int i = 0; i < Shape::R; ++i) acc[i] = 0.0f;
        mainloop.run(t, ps, acc);
        gemm::store_tile<MODE, Shape, OutT>(p, tile, t, acc, kind == gemm::TileKind::kInvalidGroup);
    }
}

}  // namespace fmo
