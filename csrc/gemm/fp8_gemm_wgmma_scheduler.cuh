// Persistent tile scheduler of the Hopper FP8 GEMM (csrc/gemm/fp8_gemm_wgmma.cuh).
//
// The grid is gridDim.x = min(tiles, SM budget) CTAs, chosen on the host as a pure function
// of (M, N, groups, block sizes, budget.compute_sms): fastmoe_ops/ops/fp8_gemm.py,
// persistent_grid(). CTA c walks tiles c, c + gridDim.x, c + 2 gridDim.x, ... of
//   tiles = groups * ceil(M / BM) * ceil(N / BN),   tile i -> (group, m-tile, n-tile)
// with n fastest: consecutive CTAs share the A rows of one m-tile (one group's tokens) and
// sweep the weight tiles. groups > 1 only in the masked view (the contiguous view finds its
// group per tile from m_indices, resolve_tile); masked tiles past masked_m[g] are skipped by
// the caller without touching memory. Seam: a TMA-multicast or L2-swizzled raster goes here.
#pragma once

#include "csrc/gemm/fp8_gemm.cuh"

namespace fmo {
namespace gemm {

template <int MODE, int BM, int BN>
struct PersistentScheduler {
    int64_t tiles_m, tiles_n, total;

    FMO_DEVICE explicit PersistentScheduler(const Fp8GemmParams& p)
        : tiles_m((p.m + BM - 1) / BM), tiles_n((p.n + BN - 1) / BN),
          total((MODE == kMasked ? p.num_groups : 1) * ((p.m + BM - 1) / BM) * ((p.n + BN - 1) / BN)) {}

    FMO_DEVICE int64_t first() const { return blockIdx.x; }
    FMO_DEVICE int64_t stride() const { return gridDim.x; }

    FMO_DEVICE Tile tile(int64_t i) const {
        const int64_t nt = i % tiles_n, rest = i / tiles_n;
        return Tile{(rest % tiles_m) * BM, nt * BN, rest / tiles_m};
    }
};

}  // namespace gemm
}  // namespace fmo
