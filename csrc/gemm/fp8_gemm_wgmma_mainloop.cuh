// Mainloop of the Hopper FP8 GEMM (sm_90a): wgmma.mma_async m64nBNk32 e4m3 from shared
// memory, with DeepSeek's per-128-K fp32 promotion. One BM x BN tile (BN = 128 or 64: one
// wgmma spans the tile's columns); BM / 64 math warpgroups, warpgroup w owning rows
// [64 w, 64 w + 64).
//
//   acc[m, n] = sum_kb  a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                       (sum_{k in block kb} a[m, k] * b[n, k])     (inner sum: 4 wgmma k32 steps)
//
// Loads: the mma.sync mainloop's cp.async stage loader (fp8_gemm_mainloop.cuh, every thread
// copies its share), whose [rows][128] e4m3 tiles with 16-byte chunks XOR-swizzled by
// row % 8 are exactly wgmma's 128-byte-swizzle K-major layout when a tile starts at a
// multiple of 1024 bytes (ptx/wgmma.cuh): SBO = 1024 (8 rows of 128 bytes), k-step s at
// start + 32 s. Stage sizes 128 (BM + BN) bytes and warpgroup slices 64 * 128 bytes keep
// every tile 1024-aligned in the 1024-aligned dynamic buffer. Seam for TMA: a producer
// warp issuing cp.async.bulk.tensor with CU_TENSOR_MAP_SWIZZLE_128B writes the same bytes.
// Per K block: wait for the stage, proxy fence (cp.async writes are generic-proxy, wgmma
// reads through the async proxy), barrier, refill the oldest stage, then fence, 4 wgmma
// into `partial` (scale-d = 0 on the first: no zeroing), commit, wait 0, promote.
// Shared memory: STAGES * (128 (BM + BN) + 4 (BM + B_SCALES)) bytes (MainloopShape).
#pragma once

#include "csrc/gemm/fp8_gemm_mainloop.cuh"
#include "ptx/wgmma.cuh"

namespace fmo {
namespace gemm {

constexpr int kWarpgroupRows = 64;  // wgmma's M

// The mma.sync MainloopShape, seen as BM / 16 warps stacked along M (warp w's rows are
// 16 w .. 16 w + 15, as in wgmma's accumulator fragment), one "warp column" of BN: its
// promote() and the shared epilogue then index wgmma's fragments correctly.
template <int BM, int BN, int STAGES, int B_SCALE_ROWS>
using WgmmaShape = MainloopShape<BM, BN, BM / 16, 1, STAGES, B_SCALE_ROWS>;

template <class Shape>
struct WgmmaMainloop {
    static_assert((Shape::BN == 128 || Shape::BN == 64) && Shape::WARPS_N == 1 && Shape::WM == 16 && Shape::MI == 1,
                  "wgmma tile: BN = 128 or 64 (one m64nBNk32 per k-step), warps stacked along M");
    static_assert(Shape::BM % kWarpgroupRows == 0, "BM: whole warpgroups of 64 rows");
    static_assert((kBlockK * Shape::BM) % 1024 == 0 && Shape::kTileBytes % 1024 == 0,
                  "every operand tile starts at a multiple of 1024 bytes (the 128B swizzle pattern)");
    static constexpr int NI = Shape::NI;  // BN / 8 n8 column groups = BN / 2 accumulator registers

    Mainloop<Shape> io;  // smem layout, cp.async stage loads and the promotion

    FMO_DEVICE void mma_stage(int stage, float (&partial)[1][NI][4]) const {
        float(&d)[4 * NI] = *reinterpret_cast<float(*)[4 * NI]>(&partial[0][0][0]);
        const int wg = threadIdx.x / 128;
        const uint8_t* a = io.tile_a(stage) + wg * kWarpgroupRows * kBlockK;
        const uint8_t* b = io.tile_b(stage);
        ptx::wgmma_fence_operands(d);  // the promotion's reads of `partial` stay before the fence ...
        ptx::wgmma_fence();            // ... which orders them before the MMAs write it
#pragma unroll
        for (int ks = 0; ks < kBlockK / 32; ++ks) {
            // SBO: 8 rows of 128 bytes; LBO: unused by swizzled K-major layouts, "assumed 1" (ISA).
            const uint64_t da = ptx::make_smem_desc(a + 32 * ks, 16, 8 * kBlockK, ptx::Swizzle::b128);
            const uint64_t db = ptx::make_smem_desc(b + 32 * ks, 16, 8 * kBlockK, ptx::Swizzle::b128);
            if constexpr (Shape::BN == 128)
                ptx::wgmma_m64n128k32_e4m3(d, da, db, ks > 0 ? 1 : 0);
            else
                ptx::wgmma_m64n64k32_e4m3(d, da, db, ks > 0 ? 1 : 0);
        }
        ptx::wgmma_commit();
        ptx::wgmma_wait<0>();  // D defined, and the stage's smem no longer read
        ptx::wgmma_fence_operands(d);
    }

    // The whole K loop of one tile. acc must be zeroed by the caller.
    FMO_DEVICE void run(const TileOperands& t, float (&acc)[1][NI][4]) const {
        const int warp = threadIdx.x / 32;
#pragma unroll
        for (int s = 0; s < Shape::STAGES - 1; ++s) {
            if (s < t.k_blocks) io.load_stage(t, s, s);
            ptx::cp_async_commit();
        }
        float partial[1][NI][4];
        for (int64_t kb = 0; kb < t.k_blocks; ++kb) {
            ptx::cp_async_wait<Shape::STAGES - 2>();  // this thread's copies of block kb landed
            ptx::fence_proxy_async_shared();          // ... and are visible to wgmma's async proxy
            __syncthreads();  // everyone's landed (wgmma reads all of them), block kb-1 consumed
            const int64_t next = kb + Shape::STAGES - 1;
            if (next < t.k_blocks) io.load_stage(t, int(next % Shape::STAGES), next);
            ptx::cp_async_commit();
            const int stage = int(kb % Shape::STAGES);
            mma_stage(stage, partial);
            io.promote(stage, warp, 0, partial, acc);
        }
        ptx::cp_async_wait_all();  // nothing may still land in shared memory after the tile
    }
};

}  // namespace gemm
}  // namespace fmo
