// Persistent tile scheduler of the warp-specialised Hopper FP8 GEMM (issue 15).
//
// The grid is min(tiles, SM budget) CTAs, a pure function of the shape and the budget
// (host: fastmoe_ops/ops/fp8_gemm_config.py picks BM x BN; the grid is min(upper bound on
// tiles, compute SMs)). Every role of a CTA (the TMA producer warp and both math warpgroups)
// runs its own copy of this scheduler and calls next() in lock step with the others: the
// sequence depends only on blockIdx.x, gridDim.x and the problem, never on timing, so the
// producer fills the ring for exactly the tiles the math warpgroups will consume.
//
// Tile index i = blockIdx.x + j * gridDim.x (j = 0, 1, ...), mapped to (group, m-block,
// n-block):
//   kDense / kContiguous   one problem of ceil(M / BM) x ceil(N / BN) tiles (contiguous: the
//                          group is found per m-block from m_indices by resolve_tile: every
//                          block of BM rows belongs to one expert, or is padding);
//   kMasked                expert g owns ceil(masked_m[g] / BM) x ceil(N / BN) tiles, laid
//                          out expert after expert: an empty expert owns none, rows past
//                          masked_m[g] are never scheduled (no CTA spins on skipped tiles).
//                          The walk over experts is a cursor that only moves forward (tile
//                          indices grow), so a CTA reads each masked_m[g] about once.
// Raster inside a problem: bands of BAND_M m-blocks, m fastest inside a band. The gridDim.x
// tiles in flight at once then touch ~BAND_M A row-blocks and ~gridDim.x / BAND_M weight
// column-blocks, so both are reused from L2 instead of re-read from HBM (the cost model's
// RASTER_BAND_M term is this band).
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"

namespace fmo {
namespace gemm {

// m-blocks per raster band: fastmoe_ops/ops/fp8_gemm_config.py RASTER_BAND_M (the cost model's
// L2 term) mirrors it; tests/test_fp8_gemm_config.py keeps the two equal.
constexpr int kRasterBandM = 8;

template <int MODE, int BM, int BN, int BAND_M>
struct WsScheduler {
    static_assert(BM > 0 && BN > 0 && BAND_M > 0, "positive tile and band");

    int64_t tiles_m;          // m-blocks of the current problem (masked: of expert `group`)
    int64_t tiles_n;
    int64_t num_groups;
    const int32_t* masked_m;  // kMasked: [num_groups] valid rows per expert
    int64_t m_rows;           // dense / contiguous: M; masked: Mmax (bounds masked_m)
    int64_t index;            // this CTA's next tile index
    int64_t group = 0;        // kMasked cursor: the expert holding tile `group_first`
    int64_t group_first = 0;  // kMasked: index of the first tile of expert `group`

    FMO_DEVICE WsScheduler(int64_t m, int64_t n, int64_t groups, const int32_t* masked)
        : tiles_m((m + BM - 1) / BM), tiles_n((n + BN - 1) / BN), num_groups(groups), masked_m(masked),
          m_rows(m), index(blockIdx.x) {
        if (MODE == kMasked) tiles_m = group_tiles_m(0);
    }

    // The next tile of this CTA; false once it has none left (uniform over the CTA).
    FMO_DEVICE bool next(Tile& t) {
        const int64_t i = index;
        index += gridDim.x;
        if constexpr (MODE != kMasked) {
            if (i >= tiles_m * tiles_n) return false;
            t = raster(i, 0);
            return true;
        } else {
            while (group < num_groups) {
                const int64_t count = tiles_m * tiles_n;
                if (i < group_first + count) {
                    t = raster(i - group_first, group);
                    return true;
                }
                group_first += count;
                ++group;
                tiles_m = group < num_groups ? group_tiles_m(group) : 0;
            }
            return false;
        }
    }

   private:
    FMO_DEVICE int64_t group_tiles_m(int64_t g) const {
        if (g >= num_groups) return 0;
        int64_t rows = masked_m[g];
        rows = rows < 0 ? 0 : (rows > m_rows ? m_rows : rows);  // the launcher refuses others; never overrun
        return (rows + BM - 1) / BM;
    }

    // Tile j of a tiles_m x tiles_n problem in the banded raster.
    FMO_DEVICE Tile raster(int64_t j, int64_t g) const {
        const int64_t band = j / (BAND_M * tiles_n), in_band = j % (BAND_M * tiles_n);
        const int64_t first_m = band * BAND_M;
        const int64_t band_m = tiles_m - first_m < BAND_M ? tiles_m - first_m : BAND_M;  // last band: fewer
        return Tile{(first_m + in_band % band_m) * BM, (in_band / band_m) * BN, g};
    }
};

}  // namespace gemm
}  // namespace fmo
