// FP8 GEMM with DeepSeek's fine-grained scaling on Hopper's wgmma (sm_90a; QGMMA in SASS):
//
//   out[m, n] = out_dtype( sum_kb a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                                  sum_{k in kb} a[m, k] * b[n, k] )
// Same operands, Params, problem views (kDense / kContiguous / kMasked, resolve_tile) and
// epilogue as the mma.sync kernel (csrc/gemm/fp8_gemm.cuh, whose header comment defines
// them); what differs is the MMA and the schedule:
//   mainloop   csrc/gemm/fp8_gemm_wgmma_mainloop.cuh: cp.async into the 128B-swizzled
//              K-major layout, 4 x wgmma.m64nBNk32 per 128-wide K block, fp32 promotion.
//   scheduler  csrc/gemm/fp8_gemm_ws_scheduler.cuh (the warp-specialised kernel's): persistent
//              CTAs, grid = min(tiles, SM budget), banded L2 raster, masked experts' empty
//              rows never scheduled.
//   epilogue   gemm::epilogue (fp8_gemm.cuh): wgmma's accumulator fragment is the mma.sync
//              C fragment of warp w covering rows 16 w .. 16 w + 15, so it is shared as is.
// Roles: BM / 64 warpgroups (128 or 256 threads), each computing 64 rows x BN (128 or 64)
// columns (BN / 2 fp32 accumulators + BN / 2 per-K-block partial sums per thread); every
// thread also loads.
// Shared memory: STAGES * (128 (BM + BN) + 4 (BM + B_SCALES)) bytes, 1024-aligned tiles; the
// epilogue's BM x (BN + 16 B) staging tile reuses it.
// Constraints: K % 16 == 0 (cp.async's 16-byte chunks: the launcher refuses otherwise),
// contiguous operands; ragged M, N and K tails are zero-filled by the loads.
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"
#include "csrc/gemm/fp8_gemm_wgmma_mainloop.cuh"
#include "csrc/gemm/fp8_gemm_ws_scheduler.cuh"

namespace fmo {

template <int MODE, int BM, int BN, int STAGES, int B_SCALE_ROWS, typename OutT>
__device__ __forceinline__ void fp8_gemm_wgmma(const Fp8GemmParams& p) {
    using Shape = gemm::WgmmaShape<BM, BN, STAGES, B_SCALE_ROWS>;
    static_assert(sizeof(OutT) == 2 || sizeof(OutT) == 4, "out: bf16 or fp32");
    gemm::WsScheduler<MODE, BM, Shape::BN, gemm::kRasterBandM> sched(p.m, p.n, p.num_groups, p.masked_m);
    const gemm::WgmmaMainloop<Shape> mainloop{{fmo_fp8_gemm_smem}};

    gemm::Tile tile;
    while (sched.next(tile)) {
        gemm::TileOperands t;
        const gemm::TileKind kind = gemm::resolve_tile<MODE, Shape>(p, tile, t);
        if (kind == gemm::TileKind::kSkip) continue;  // resolve_tile's contract; the scheduler already leaves out rows past masked_m[g]

        float acc[1][Shape::NI][4];
#pragma unroll
        for (int ni = 0; ni < Shape::NI; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[0][ni][r] = 0.0f;
        mainloop.run(t, acc);
        gemm::epilogue<MODE, Shape, OutT>(p, tile, t, acc, kind == gemm::TileKind::kInvalidGroup, fmo_fp8_gemm_smem);
        __syncthreads();  // the epilogue's reads of the staging tile precede the next tile's loads
    }
}

}  // namespace fmo
