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
// Epilogue (EPILOGUE, csrc/gemm/fp8_gemm_epilogue.cuh): kRegisters stores registers straight
// to global memory; kTmaStore stages each warpgroup's 64 x BN outputs in its own shared-memory
// region (not the ring) and TMA-stores them. Neither borrows the ring, so the producer keeps
// loading the next tile's blocks while a warpgroup stores, and neither warpgroup waits for the
// other. Which wins is for the GPU benchmark to say (bench/bench_fp8.py times both), not yet
// measured; the launcher defaults to kRegisters.
// Scales: plain loads by the math threads, not TMA (a_scale's per-tile column is 4 bytes
// wide, under TMA's 16-byte minimum): see fp8_gemm_wgmma_mainloop.cuh.
// Shared memory: kTmaStore's staging, BM x BN OutT (one region per math warpgroup), then the
// ring, STAGES * (128 (BM + BN) + 16) bytes (WsSmem below).
// Constraints (the launcher refuses otherwise, before any launch): K % 16 == 0 (the maps'
// row stride is K bytes, which TMA wants a multiple of 16), 16-byte aligned A and B, contiguous
// operands; kTmaStore also N * sizeof(OutT) % 16 == 0 and a 16-byte aligned out (else the
// launcher picks kRegisters). Ragged M, N and K are the maps' zero fill plus the epilogue's bounds.
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"
#include "csrc/gemm/fp8_gemm_epilogue.cuh"
#include "csrc/gemm/fp8_gemm_wgmma_mainloop.cuh"
#include "csrc/gemm/fp8_gemm_ws_scheduler.cuh"
#include "ptx/warp.cuh"

namespace fmo {

struct Fp8GemmWsParams {
    Fp8GemmParams g;          // pointers (A and B also through the maps) and sizes
    ptx::TmaDescriptor a_map; // A as [rows, K] e4m3 (masked: G * Mmax rows), box 128 x BM, 128B swizzle
    ptx::TmaDescriptor b_map; // B as [G * N, K] e4m3, box 128 x BN, 128B swizzle
    ptx::TmaDescriptor out_map; // kTmaStore: out as [rows, N] (masked: G * Mmax rows), box StoreBox (else unused)
};

namespace gemm {

constexpr int kProducerRegs = 40;  // the producer lane needs addresses and a loop counter
// Math registers after setmaxnreg: 128 x 40 + 256 x 232 = 64512 of the SM's 65536 (BM = 128);
// one math warpgroup (BM = 64) may take up to 248 (fastmoe_ops/ops/fp8_gemm_config.py: MATH_REGS
// is the smaller, so the cost model's register check holds for both).
constexpr uint32_t kMathRegs2 = 232, kMathRegs1 = 248;  // two math warpgroups (BM = 128), one (BM = 64)

}  // namespace gemm

// Dynamic shared memory of one variant: staging (kTmaStore) then the ring. The launcher's
// smem_bytes() mirrors it (its stub static_asserts the two agree).
template <int BM, int BN, int STAGES, int B_SCALE_ROWS, typename OutT, int EPILOGUE>
struct WsSmem {
    static constexpr int kStagingBytes =
        EPILOGUE == gemm::kTmaStore ? BM / gemm::kWarpgroupRows * gemm::StoreBox<BN, OutT>::kStagingBytes : 0;
    static constexpr int kSmemBytes = kStagingBytes + gemm::WsShape<BM, BN, STAGES, B_SCALE_ROWS>::kSmemBytes;
};

template <int MODE, int BM, int BN, int STAGES, int B_SCALE_ROWS, typename OutT, int EPILOGUE = gemm::kRegisters,
          bool UNSAFE_EARLY_RELEASE = false, bool UNSAFE_STORE_REUSE = false>
__device__ __forceinline__ void fp8_gemm_wgmma(const Fp8GemmWsParams& P) {
    using Shape = gemm::WsShape<BM, BN, STAGES, B_SCALE_ROWS>;
    using Smem = WsSmem<BM, BN, STAGES, B_SCALE_ROWS, OutT, EPILOGUE>;
    static_assert(sizeof(OutT) == 2 || sizeof(OutT) == 4, "out: bf16 or fp32");
    static_assert(EPILOGUE == gemm::kRegisters || EPILOGUE == gemm::kTmaStore, "epilogue: registers or TMA store");
    static_assert(!UNSAFE_STORE_REUSE || EPILOGUE == gemm::kTmaStore, "unsafe_store_reuse: a TMA-store bug");
    const Fp8GemmParams& p = P.g;
    const gemm::Ring<Shape> ring{fmo_fp8_gemm_smem + Smem::kStagingBytes};
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
    using Staged = gemm::StagedStore<MODE, Shape, OutT, UNSAFE_STORE_REUSE>;
    const Staged staged{fmo_fp8_gemm_smem + (threadIdx.x / 128 - 1) * Staged::Box::kStagingBytes, &P.out_map};
    while (sched.next(tile)) {
        gemm::TileOperands t;
        const gemm::TileKind kind = gemm::resolve_tile<MODE, Shape>(p, tile, t);
        if (kind == gemm::TileKind::kSkip) continue;  // resolve_tile's contract; the scheduler already leaves those out
        float acc[Shape::R];
#pragma unroll
        for (int i = 0; i < Shape::R; ++i) acc[i] = 0.0f;
        mainloop.run(t, ps, acc);
        const bool nan_rows = kind == gemm::TileKind::kInvalidGroup;
        if (EPILOGUE == gemm::kTmaStore)
            staged.store(p, tile, t, acc, nan_rows);
        else
            gemm::store_tile<MODE, Shape, OutT>(p, tile, t, acc, nan_rows);
    }
    if (EPILOGUE == gemm::kTmaStore) Staged::drain();
}

}  // namespace fmo
