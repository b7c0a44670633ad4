// Epilogues of the warp-specialised Hopper FP8 GEMM (csrc/gemm/fp8_gemm_wgmma.cuh): how a math
// warpgroup's 64 x BN fp32 accumulators (the mma.sync C layout per warp: ptx/wgmma.cuh) reach
// global memory. A compile-time choice (EPILOGUE; the launcher's Fp8GemmWgmmaSpec.epilogue,
// default registers). Which is faster is for a GPU run of bench/bench_fp8.py to say (its dense
// rows time both on the same operands); not yet measured.
//
//   kRegisters  registers straight to global memory (store_tile): 4- or 8-byte column pairs
//               per thread, no shared memory, no barrier.
//   kTmaStore   registers -> the warpgroup's own staging region -> TMA store (StagedStore):
//                 issuer   tma_store_wait<0>     the previous tile's boxes were read out of staging
//                 all 128  bar.sync(1 + wg)      so nobody overwrites them before that
//                 all 128  st.shared fragments   row policy applied, swizzled as the out map
//                 all 128  fence.proxy.async     publishes those st.shared writes to the async proxy
//                 all 128  bar.sync(1 + wg)      every thread's writes and fence are done
//                 issuer   tma_store_2d per box, commit; then on to the next tile's K loop
//               and before the kernel exits the issuer waits for its stores' reads (a store
//               whose source is freed unread is undefined; the simulator drops it).
//               Staging is not the ring: the producer keeps loading the next tile's blocks
//               while a warpgroup stores, and the warpgroups never wait for each other.
//               Whole 128-byte lines leave the SM instead of 32-byte sectors, and the math
//               threads hand the global stores to the TMA unit.
//
// Staging (StoreBox): per warpgroup, kBoxes boxes of [64 rows][kInner bytes] OutT, each the
// dense image the TMA store reads, with the out map's swizzle: kInner is the widest swizzle
// span (128, 64, 32 bytes) that divides a tile row (BN * sizeof(OutT)), whose XOR of the 16-byte
// chunk index with the row (ptx/tma.cuh) puts a warp's 8 fragment rows in 8 different chunks
// (no bank conflict); else (bf16 BN 24, 40, 56: 48 / 80 / 112-byte rows) 16 bytes unswizzled,
// where a warp's 8 rows of one chunk are 128 contiguous bytes (no conflict either). The out map
// (fastmoe_ops/ops/fp8_gemm_config.py store_box, the launcher's mirror) is out viewed as
// [rows, N] (masked: [G * Mmax, N]) with box (kInner / sizeof(OutT), 64): TMA clips rows past M
// and columns past N (ragged M and N).
// Row policy, both epilogues: contiguous padding rows (m_indices -1) are 0, a bad group's rows
// NaN, rows past the tile's valid rows and columns past N unwritten. A masked group's rows past
// masked_m must stay unwritten, but a box stops only at the map's bounds (a 3D [G, Mmax, N] map
// would stop at Mmax, not at masked_m): a warpgroup whose 64 rows are not all valid copies its
// valid rows out of staging with plain stores instead of the TMA store (at most one tile per
// group and warpgroup, the group's last). Not store_tile: a second path from the accumulators
// keeps them live across both and spilled (ptxas, masked 128 x 128).
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"
#include "csrc/gemm/fp8_gemm_wgmma_mainloop.cuh"
#include "ptx/barrier.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"

namespace fmo {
namespace gemm {

enum Epilogue : int { kRegisters = 0, kTmaStore = 1 };

template <typename OutT>
FMO_DEVICE OutT from_float(float v) {
    if constexpr (sizeof(OutT) == 2) return __float2bfloat16(v); else return v;
}

// The values of output row r of the tile (both epilogues): 0 on a contiguous padding row, NaN
// on a bad group's. r < t.rows_a is checked before m_indices is read (a staged box also covers
// rows past M, which TMA clips).
template <int MODE>
FMO_DEVICE void apply_row_policy(const Fp8GemmParams& p, const Tile& tile, const TileOperands& t, int r,
                                 bool nan_rows, float& v0, float& v1) {
    if (MODE == kContiguous && r < t.rows_a && p.m_indices[tile.m0 + r] < 0) v0 = v1 = 0.0f;
    if (nan_rows) v0 = v1 = __int_as_float(0x7fc00000);
}

// Registers -> global (kRegisters).
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
        OutT* row = out + (tile.m0 + r) * p.n + tile.n0;
#pragma unroll
        for (int ni = 0; ni < Shape::BN / 8; ++ni) {
            const int c = ni * 8 + 2 * tq;
            if (c >= t.rows_b) continue;
            float v0 = acc[4 * ni + 2 * h], v1 = acc[4 * ni + 2 * h + 1];
            apply_row_policy<MODE>(p, tile, t, r, nan_rows, v0, v1);
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

// The staged epilogue's box geometry; fastmoe_ops/ops/fp8_gemm_config.py store_box mirrors
// kInner and kSwizzle (the launcher's stub static_asserts the two agree).
template <int BN, typename OutT>
struct StoreBox {
    static constexpr int kRowBytes = BN * int(sizeof(OutT));  // one tile row
    static constexpr int kInner = kRowBytes % 128 == 0 ? 128 : kRowBytes % 64 == 0 ? 64 : kRowBytes % 32 == 0 ? 32 : 16;
    static constexpr int kSwizzle = kInner >= 32 ? kInner : 0;  // bytes of the swizzle span, 0: none
    static constexpr int kCols = kInner / int(sizeof(OutT));    // the box's inner extent (elements)
    static constexpr int kBoxes = kRowBytes / kInner;           // boxes per warpgroup and tile
    static constexpr int kBoxBytes = kWarpgroupRows * kInner;
    static constexpr int kStagingBytes = kBoxes * kBoxBytes;    // one warpgroup's region: 64 x BN OutT
    static_assert(kRowBytes % 16 == 0, "a tile row is whole 16-byte chunks (BN % 8 == 0)");
    static_assert(kStagingBytes % 1024 == 0, "each region (and the ring after them) stays 1024-aligned");
    static_assert(kBoxBytes % (kSwizzle == 0 ? 128 : 8 * kSwizzle) == 0, "every box starts where its swizzle repeats");

    // Byte offset in a warpgroup's region of element (row, col): the box, then the
    // swizzle's XOR of the 16-byte chunk index with the 128-byte line (ptx/tma.cuh).
    FMO_DEVICE static int offset(int row, int col) {
        const int bytes = col * int(sizeof(OutT));
        const int lin = row * kInner + bytes % kInner;
        constexpr int mask = kSwizzle / 16 - 1 > 0 ? kSwizzle / 16 - 1 : 0;
        return (bytes / kInner) * kBoxBytes + (lin ^ (((lin >> 7) & mask) << 4));
    }
};

// One math warpgroup's staged epilogue (kTmaStore). Thread 0 of the warpgroup issues every
// store and wait: bulk async-groups belong to the thread that commits them.
template <int MODE, class Shape, typename OutT, bool UNSAFE_STORE_REUSE>
struct StagedStore {
    using Box = StoreBox<Shape::BN, OutT>;
    uint8_t* staging;                   // this warpgroup's region
    const ptx::TmaDescriptor* out_map;  // out as [rows, N], box (Box::kCols, 64)

    FMO_DEVICE static int warpgroup() { return threadIdx.x / 128 - 1; }
    FMO_DEVICE static bool issuer() { return threadIdx.x % 128 == 0; }
    FMO_DEVICE static void sync() { ptx::bar_sync(1 + warpgroup(), 128); }  // id 0 is __syncthreads

    // Whether this warpgroup's rows of the tile leave staging by TMA store (see the header: masked
    // tiles ending inside the warpgroup's rows do not). Uniform over the warpgroup.
    FMO_DEVICE static bool by_tma(const TileOperands& t) {
        return MODE != kMasked || t.rows_a >= (warpgroup() + 1) * kWarpgroupRows;
    }

    FMO_DEVICE void store(const Fp8GemmParams& p, const Tile& tile, const TileOperands& t,
                          const float (&acc)[Shape::R], bool nan_rows) const {
        const int wg = warpgroup(), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
        const int g = lane / 4, tq = lane % 4;
        // UNSAFE_STORE_REUSE (tests only): overwrite staging while the previous tile's boxes may
        // still be unread -- the bug this wait exists for; the simulator performs a store at its
        // wait, so the earlier tile's rows get this tile's values.
        if (!UNSAFE_STORE_REUSE && issuer()) ptx::tma_store_wait<0>();
        sync();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp * 16 + g + 8 * h;  // row in the warpgroup's 64
#pragma unroll
            for (int ni = 0; ni < Shape::BN / 8; ++ni) {
                const int c = ni * 8 + 2 * tq;
                float v0 = acc[4 * ni + 2 * h], v1 = acc[4 * ni + 2 * h + 1];
                apply_row_policy<MODE>(p, tile, t, wg * kWarpgroupRows + r, nan_rows, v0, v1);
                uint8_t* dst = staging + Box::offset(r, c);  // the pair shares a 16-byte chunk
                if constexpr (sizeof(OutT) == 2)
                    *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(v0, v1);
                else
                    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
            }
        }
        ptx::fence_proxy_async();  // publishes this thread's st.shared writes to the TMA store (async proxy)
        sync();
        const int64_t row0 = (MODE == kMasked ? tile.group * p.m : 0) + tile.m0 + wg * kWarpgroupRows;
        if (!by_tma(t)) {
            copy_rows(p, row0, tile.n0, int(t.rows_a - wg * kWarpgroupRows), t.rows_b);
        } else if (issuer()) {
#pragma unroll
            for (int b = 0; b < Box::kBoxes; ++b)
                ptx::tma_store_2d(out_map, staging + b * Box::kBoxBytes, int32_t(tile.n0 + b * Box::kCols),
                                  int32_t(row0));
            ptx::tma_store_commit();
        }
    }

    // The first `rows` rows (< 64) and `cols` columns of staging to out[row0.., n0..], by the
    // warpgroup's 128 threads, consecutive threads on consecutive columns (coalesced). The next
    // store()'s first barrier keeps staging until every thread has read its elements.
    FMO_DEVICE void copy_rows(const Fp8GemmParams& p, int64_t row0, int64_t n0, int rows, int64_t cols) const {
        OutT* out = static_cast<OutT*>(p.out) + row0 * p.n + n0;
        for (int i = threadIdx.x % 128; i < rows * Shape::BN; i += 128) {
            const int r = i / Shape::BN, c = i % Shape::BN;
            if (c < cols) out[r * p.n + c] = *reinterpret_cast<const OutT*>(staging + Box::offset(r, c));
        }
    }

    // Before the kernel exits: the last boxes have been read out of shared memory.
    FMO_DEVICE static void drain() {
        if (issuer()) ptx::tma_store_wait<0>();
    }
};

}  // namespace gemm
}  // namespace fmo
