// The two roles of the warp-specialised Hopper FP8 GEMM's K loop (sm_90a), around a ring of
// STAGES shared-memory stages (the kernel, csrc/gemm/fp8_gemm_wgmma.cuh, draws the whole
// picture and owns the tile loop):
//
//   producer (one elected lane)            math warpgroup w (64 rows of the BM x BN tile)
//   wait empty[s] (phase ^ 1)               wait full[s] (phase)
//   arrive.expect_tx full[s], 128 (BM+BN)   fence, 4 x wgmma m64nBNk32 -> partial[kb % 2], commit
//   TMA A box [128 K x BM rows] -> A[s]     wait_group<1>: block kb-1's MMAs retired, so
//   TMA B box [128 K x BN rows] -> B[s]       arrive empty[s of kb-1] (one lane per warp), and
//                                             acc += partial[(kb-1) % 2] * a_scale * b_scale
//                                           (block kb's MMAs still run on the tensor cores)
//
//   acc[m, n] = sum_kb  a_scale[m, kb] * b_scale[n / B_SCALE_ROWS, kb] *
//                       (sum_{k in block kb} a[m, k] * b[n, k])     (inner sum: QGMMA, ~14 bits)
//
// Stage s: A [BM][128] e4m3 then B [BN][128] e4m3, each a TMA box with the 128-byte swizzle,
// which is wgmma's K-major B128 layout when the box starts at a multiple of 1024 bytes:
// SBO = 1024 (8 rows of 128 bytes), k-step j at start + 32 j, warpgroup w's rows at
// A[s] + w * 64 * 128. 128 (BM + BN) is a multiple of 1024 (BN % 8 == 0), so every box stays
// 1024-aligned in the 1024-aligned dynamic buffer. Every box's inner extent is 128 K bytes, the
// 128B swizzle's span (runtime/tensor_map.py requires it); BM / BN are the outer extents, so a
// decode tile (BN 16..56) only shortens B's box. Out-of-range rows and the K tail are the
// map's zero fill (they add 0); the full box's bytes are always announced (TMA counts them).
//
// Scales are not in the ring: a_scale is [M, ceil(K/128)] fp32, so the 128 (or 64) scales of
// one tile and K block are a column of 4-byte elements, and a TMA box's inner extent must be
// a multiple of 16 bytes (PTX ISA, "Tensor Memory Access"; runtime/tensor_map.py refuses it;
// MN-major scales from the quantiser would lift this). The math threads read their
// own with plain loads instead: a thread's 2 rows' a-scales and the tile's (at most 2)
// 128 x 128 b-scales are loaded before its full-barrier wait for the block (their latency
// overlaps the wait and the MMAs) and used one step later, at the promotion. Per-row b scales
// (B_SCALE_ROWS = 1, wgrad): lane l loads columns 32 j + l (BN / 32 registers, not BN / 4),
// and the promotion takes each of its columns' scale from the lane holding it (shfl).
//
// Registers per math thread: BN / 2 accumulators + 2 x BN / 2 partial sums (the block in
// flight and the one being promoted): BN <= 128 (fastmoe_ops/ops/fp8_gemm_config.py), <= 112
// with per-row b scales (their BN / 32 registers per block in flight).
// UNSAFE_EARLY_RELEASE (tests only): arrive on empty[s] right after committing the MMAs that
// read stage s, before they retired -- the bug this design must not have; the simulator's
// TMA poisons the refilled stage under the pending MMAs (tests/test_fp8_gemm_wgmma.py).
#pragma once

#include "csrc/common/pipeline.cuh"
#include "csrc/gemm/fp8_gemm.cuh"
#include "ptx/mbarrier.cuh"
#include "ptx/tma.cuh"
#include "ptx/wgmma.cuh"

namespace fmo {
namespace gemm {

constexpr int kWarpgroupRows = 64;  // wgmma's M

template <int BM_, int BN_, int STAGES_, int B_SCALE_ROWS_>
struct WsShape {
    static constexpr int BM = BM_, BN = BN_, STAGES = STAGES_, B_SCALE_ROWS = B_SCALE_ROWS_;
    static constexpr int kMathWarpgroups = BM / kWarpgroupRows;
    static constexpr int kThreads = 128 * (1 + kMathWarpgroups);  // producer warpgroup + math
    static constexpr int kStageBytes = kBlockK * (BM + BN);
    static constexpr int kSmemBytes = STAGES * (kStageBytes + 16);  // + full and empty barrier
    static constexpr int R = BN / 2;  // accumulator registers per thread (one m64nBN fragment)
    // Weight scales per 128 x 128 block: a tile's columns touch one block when BN divides 128
    // (tiles start at multiples of BN), else at most two (BN <= 128).
    static constexpr int kBScaleBlocks = B_SCALE_ROWS == 1 ? 0 : (128 % BN == 0 ? 1 : 2);
    static_assert(BM == 64 || BM == 128, "BM: one or two math warpgroups of 64 rows");
    // BN 16..56: decode tiles (small M: more, narrower tiles over the SMs); any multiple of 8 keeps
    // the B box a whole number of 8-row swizzle groups (1024 B) and the stage 1024-aligned.
    static_assert(BN % 8 == 0 && BN >= 16 && BN <= 128, "BN: a wgmma N of ptx/wgmma.cuh, 16..128 (registers)");
    static_assert(kStageBytes % 1024 == 0, "every TMA box starts at a multiple of 1024 bytes (128B swizzle)");
    static_assert(B_SCALE_ROWS == 1 || B_SCALE_ROWS == 128, "b scales per row or per 128 x 128 block");
    static_assert(B_SCALE_ROWS == 128 || BN <= 112, "per-row b scales: BN <= 112 (BN 128 spills)");
    static_assert(STAGES >= 2, "a ring needs two stages");
};

// The ring in dynamic shared memory: STAGES x (A box, B box), then full[] and empty[].
template <class Shape>
struct Ring {
    uint8_t* smem;
    FMO_DEVICE uint8_t* tile_a(int s) const { return smem + s * Shape::kStageBytes; }
    FMO_DEVICE uint8_t* tile_b(int s) const { return tile_a(s) + kBlockK * Shape::BM; }
    FMO_DEVICE uint64_t* full(int s) const {
        return reinterpret_cast<uint64_t*>(smem + Shape::STAGES * Shape::kStageBytes) + s;
    }
    FMO_DEVICE uint64_t* empty(int s) const { return full(Shape::STAGES) + s; }

    // One thread, before the roles split (then fence + __syncthreads publish them).
    FMO_DEVICE void init() const {
        for (int s = 0; s < Shape::STAGES; ++s) {
            ptx::mbarrier_init(full(s), 1);                            // the producer's expect_tx
            ptx::mbarrier_init(empty(s), 4 * Shape::kMathWarpgroups);  // one lane per math warp
        }
        ptx::fence_mbarrier_init();  // the inits, to the async proxy (TMA completes on them)
    }
};

// The producer lane: every K block of one tile into the ring.
template <class Shape>
FMO_DEVICE void produce_tile(const Ring<Shape>& ring, const ptx::TmaDescriptor* a_map, const ptx::TmaDescriptor* b_map,
                             const TileOperands& t, PipelineState& ps) {
    for (int64_t kb = 0; kb < t.k_blocks; ++kb, ps.advance(Shape::STAGES)) {
        ptx::mbarrier_wait_parity(ring.empty(ps.stage), ps.phase ^ 1);  // the stage's last reader retired
        ptx::mbarrier_arrive_expect_tx(ring.full(ps.stage), Shape::kStageBytes);
        const int32_t k0 = int32_t(kb * kBlockK);
        ptx::tma_load_2d(ring.tile_a(ps.stage), a_map, ring.full(ps.stage), k0, int32_t(t.a_row));
        ptx::tma_load_2d(ring.tile_b(ps.stage), b_map, ring.full(ps.stage), k0, int32_t(t.b_row));
    }
}

// One math warpgroup's K loop of one tile.
template <class Shape, bool UNSAFE_EARLY_RELEASE>
struct WsMainloop {
    static constexpr int R = Shape::R;
    Ring<Shape> ring;
    const Fp8GemmParams* p;

    // Per-row b scales: lane l holds column 32 j + l's; promote() shuffles each thread's columns.
    static constexpr int kBRegs = Shape::kBScaleBlocks > 0 ? Shape::kBScaleBlocks : (Shape::BN + 31) / 32;

    struct Scales {
        float a[2];  // this thread's rows g and g + 8 of its warp's 16
        float b[kBRegs];
    };

    FMO_DEVICE Scales load_scales(const TileOperands& t, int64_t kb) const {
        const int wg = threadIdx.x / 128 - 1, warp = (threadIdx.x / 32) % 4, g = (threadIdx.x % 32) / 4;
        Scales s;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t r = wg * kWarpgroupRows + warp * 16 + g + 8 * h;
            s.a[h] = r < t.rows_a ? t.a_scale[r * p->k_blocks + kb] : 0.0f;  // rows past the tile's end: unwritten
        }
#pragma unroll
        for (int j = 0; j < kBRegs; ++j) {
            // blocks: the tile's j-th 128 x 128 block; rows: column n0 + 32 j + lane
            const int64_t row = Shape::kBScaleBlocks > 0 ? t.n0 / 128 + j : t.n0 + 32 * j + threadIdx.x % 32;
            s.b[j] = row < p->b_scale_rows ? t.b_scale[row * p->k_blocks + kb] : 0.0f;
        }
        return s;
    }

    // acc += partial * a_scale[row] * b_scale[col]. Fragment register 4 ni + i: row g + 8 (i >= 2),
    // column 8 ni + 2 tq + (i % 2) (the mma.sync C layout per warp: ptx/wgmma.cuh).
    FMO_DEVICE void promote(const TileOperands& t, const Scales& s, const float (&partial)[R],
                            float (&acc)[R]) const {
        const int tq = threadIdx.x % 4;
        const int off = int(t.n0 % 128);
#pragma unroll
        for (int ni = 0; ni < Shape::BN / 8; ++ni)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                float b_s;
                if constexpr (Shape::kBScaleBlocks == 0) {
                    b_s = __shfl_sync(0xffffffffu, s.b[ni * 8 / 32], (ni * 8 + 2 * tq + c) % 32);
                } else if constexpr (Shape::kBScaleBlocks == 1) {
                    b_s = s.b[0];
                } else {
                    b_s = off + ni * 8 >= 128 ? s.b[Shape::kBScaleBlocks - 1] : s.b[0];
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int i = 4 * ni + 2 * h + c;
                    acc[i] = fmaf(partial[i], s.a[h] * b_s, acc[i]);
                }
            }
    }

    // Wait for stage ps's bytes, then issue its 4 MMAs into `d` (not waited for).
    FMO_DEVICE void issue(const PipelineState& ps, float (&d)[R]) const {
        ptx::mbarrier_wait_parity(ring.full(ps.stage), ps.phase);  // TMA's bytes landed (async proxy: no fence)
        const int wg = threadIdx.x / 128 - 1;
        const uint8_t* a = ring.tile_a(ps.stage) + wg * kWarpgroupRows * kBlockK;
        const uint8_t* b = ring.tile_b(ps.stage);
        ptx::wgmma_fence_operands(d);  // earlier reads of d (its promotion) stay before the fence ...
        ptx::wgmma_fence();            // ... which orders them before the MMAs overwrite it
#pragma unroll
        for (int ks = 0; ks < kBlockK / 32; ++ks) {
            // SBO: 8 rows of 128 bytes; LBO unused by swizzled K-major layouts ("assumed 1", ISA).
            const uint64_t da = ptx::make_smem_desc(a + 32 * ks, 16, 8 * kBlockK, ptx::Swizzle::b128);
            const uint64_t db = ptx::make_smem_desc(b + 32 * ks, 16, 8 * kBlockK, ptx::Swizzle::b128);
            ptx::wgmma_m64nNk32_e4m3<Shape::BN>(d, da, db, ks > 0 ? 1 : 0);  // ks 0: D = A B (no zeroing)
        }
        ptx::wgmma_commit();  // no operand fence on d here: it would read registers the MMAs still write,
                              // and ptxas would then serialise the wgmmas (C7514)
        if (UNSAFE_EARLY_RELEASE) release(ps.stage);
    }

    FMO_DEVICE void release(uint32_t stage) const {
        if (threadIdx.x % 32 == 0) ptx::mbarrier_arrive(ring.empty(stage));
    }

    // Block kb-1 (in `prev`, stage `stage`) retired while block kb's group may still run:
    // free its stage, promote it.
    template <int PENDING>
    FMO_DEVICE void retire(const TileOperands& t, uint32_t stage, const Scales& s, float (&prev)[R],
                           float (&acc)[R]) const {
        ptx::wgmma_wait<PENDING>();
        ptx::wgmma_fence_operands(prev);
        if (!UNSAFE_EARLY_RELEASE) release(stage);  // its MMAs read the stage for the last time
        promote(t, s, prev, acc);
    }

    // The K loop of one tile; acc zeroed by the caller. Two partial buffers, named at compile
    // time (an index by kb % 2 would put them in local memory): the loop steps two blocks, and
    // every way out of it has retired every MMA (ptxas then sees no accumulator read while a
    // wgmma may still write it, and keeps the MMAs asynchronous instead of serialising them).
    FMO_DEVICE void run(const TileOperands& t, PipelineState& ps, float (&acc)[R]) const {
        if (t.k_blocks == 0) return;
        float p0[R], p1[R];
        Scales s0 = load_scales(t, 0), s1;
        uint32_t stage0 = ps.stage, stage1;
        issue(ps, p0);
        ps.advance(Shape::STAGES);
        for (int64_t kb = 1;; kb += 2) {  // block kb-1 in p0 is in flight
            if (kb == t.k_blocks) {
                retire<0>(t, stage0, s0, p0, acc);
                return;
            }
            s1 = load_scales(t, kb);
            stage1 = ps.stage;
            issue(ps, p1);
            ps.advance(Shape::STAGES);
            retire<1>(t, stage0, s0, p0, acc);
            if (kb + 1 == t.k_blocks) {
                retire<0>(t, stage1, s1, p1, acc);
                return;
            }
            s0 = load_scales(t, kb + 1);
            stage0 = ps.stage;
            issue(ps, p0);
            ps.advance(Shape::STAGES);
            retire<1>(t, stage1, s1, p1, acc);
        }
    }
};

}  // namespace gemm
}  // namespace fmo
