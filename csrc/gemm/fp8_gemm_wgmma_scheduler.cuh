// Persistent tile scheduler of the Hopper FP8 GEMM (csrc/gemm/fp8_gemm_wgmma.cuh).
//
// The grid is gridDim.x = min(tiles, SM budget) CTAs, chosen on the host as a pure function
// of (M, N, groups, block sizes, budget.compute_sms): fastmoe_ops/ops/fp8_gemm.py,
// persistent_grid(). CTA c walks tiles c, c + gridDim.x, c + 2 gridDim.x, ... of
//   tiles = groups * ceil(M / BM) * ceil(N / BN),   tile i -> (group, m-tile, n-tile)
// groups > 1 only in the masked view (the contiguous view finds its group per tile from
// m_indices, resolve_tile); masked tiles past masked_m[g] are skipped by the caller without
// touching memory. Within a group, tiles go in bands of kBandM m-tiles, m fastest inside a
// band: the tiles in flight at once (one per CTA) then span ~kBandM A row-blocks and
// ~CTAs / kBandM weight blocks, not 1-2 A row-blocks and every weight block, so both stay in
// L2 while they are reused. Seam: TMA multicast across a cluster goes here.
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"

namespace fmo {
namespace gemm {

template <int MODE, int BM, int BN>
struct PersistentScheduler {
    int64_t tiles_m, tiles_n, total;

    FMO_DEVICE explicit PersistentScheduler(const Fp8GemmParams& p)
        : tiles_m((p.m + BM - 1) / BM), tiles_n((p.n + BN - 1) / BN),
          total((MODE == kMasked ? p.num_groups : 1) * tiles_m * tiles_n) {}  // members initialise in order

    FMO_DEVICE int64_t first() const { return blockIdx.x; }
    FMO_DEVICE int64_t stride() const { return gridDim.x; }

    static constexpr int64_t kBandM = 8;

    FMO_DEVICE Tile tile(int64_t i) const {
        const int64_t per_group = tiles_m * tiles_n;
        const int64_t group = i / per_group, j = i % per_group;
        const int64_t band = j / (kBandM * tiles_n), in_band = j % (kBandM * tiles_n);
        const int64_t first_m = band * kBandM;
        const int64_t band_m = tiles_m - first_m < kBandM ? tiles_m - first_m : kBandM;  // last band: fewer
        return Tile{(first_m + in_band % band_m) * BM, (in_band / band_m) * BN, group};
    }
};

}  // namespace gemm
}  // namespace fmo
