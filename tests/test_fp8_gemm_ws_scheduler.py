"""The warp-specialised FP8 GEMM's persistent tile scheduler (csrc/gemm/fp8_gemm_ws_scheduler.cuh)
on the simulator: every output tile is visited exactly once, by every thread of its CTA, for
ragged shapes, empty experts and various SM budgets; masked rows past masked_m are never
scheduled; the first wave keeps to one raster band of m-blocks (the L2 reuse)."""
import numpy as np
import pytest
import torch

import fastmoe_ops as fmo

SIM = pytest.mark.skipif("sim" not in fmo.available_backends(), reason="simulator not built")
BM, BN, BAND = 64, 48, 3
THREADS = 64  # two warps stand in for the roles: each runs its own scheduler copy

SRC = r'''
#include "csrc/gemm/fp8_gemm_ws_scheduler.cuh"
using namespace fmo::gemm;
constexpr int BM = TILE_M, BN = TILE_N, BAND = BAND_M_BLOCKS;
// counts[group, m-block, n-block] += 1 per thread per visit; first[cta] = first tile's m-block
// (-1: none); bad[0] counts tiles outside the problem (rows past masked_m included).
template <int MODE>
__device__ void visit(int64_t m, int64_t n, int64_t groups, const int32_t* masked_m, int32_t* counts,
                      int32_t* first, int32_t* bad) {
    WsScheduler<MODE, BM, BN, BAND> s(m, n, groups, masked_m);
    const int64_t tm = (m + BM - 1) / BM, tn = (n + BN - 1) / BN;
    Tile t;
    bool is_first = true;
    if (threadIdx.x == 0) first[blockIdx.x] = -1;
    while (s.next(t)) {
        const int64_t rows = MODE == kMasked ? masked_m[t.group] : m;
        if (t.m0 % BM || t.n0 % BN || t.m0 < 0 || t.m0 >= rows || t.n0 < 0 || t.n0 >= n || t.group < 0 || t.group >= groups) {
            atomicAdd(bad, 1);
            continue;
        }
        atomicAdd(&counts[(t.group * tm + t.m0 / BM) * tn + t.n0 / BN], 1);
        if (is_first && threadIdx.x == 0) first[blockIdx.x] = int32_t(t.m0 / BM);
        is_first = false;
    }
}
extern "C" __global__ void visit_dense(int64_t m, int64_t n, int64_t g, const int32_t* mm, int32_t* c, int32_t* f, int32_t* b) { visit<kDense>(m, n, g, mm, c, f, b); }
extern "C" __global__ void visit_contiguous(int64_t m, int64_t n, int64_t g, const int32_t* mm, int32_t* c, int32_t* f, int32_t* b) { visit<kContiguous>(m, n, g, mm, c, f, b); }
extern "C" __global__ void visit_masked(int64_t m, int64_t n, int64_t g, const int32_t* mm, int32_t* c, int32_t* f, int32_t* b) { visit<kMasked>(m, n, g, mm, c, f, b); }
'''


@pytest.fixture(scope="module")
def module():
    from fastmoe_ops import sim
    from fastmoe_ops.runtime.compiler import include_options
    return sim.RawModule(code=SRC, options=(*include_options(), f"-DTILE_M={BM}", f"-DTILE_N={BN}", f"-DBAND_M_BLOCKS={BAND}"))


def run(module, mode, m, n, groups, masked_m, sms):
    tm, tn = -(-m // BM), -(-n // BN)
    rows = [min(r, m) for r in masked_m] if mode == "masked" else [m]
    tiles = sum(-(-r // BM) for r in rows) * tn
    grid = max(1, min(groups * tm * tn if mode == "masked" else tm * tn, sms))
    counts = torch.full((groups, tm, tn), 0, dtype=torch.int32)
    first = torch.full((grid,), -7, dtype=torch.int32)  # poisoned: every CTA must write it
    bad = torch.zeros(1, dtype=torch.int32)
    mm = torch.tensor(list(masked_m) or [0], dtype=torch.int32)
    module.get_function(f"visit_{mode}")((grid,), (THREADS,), (np.int64(m), np.int64(n), np.int64(groups), mm, counts, first, bad))
    assert bad.item() == 0 and (first != -7).all()
    want = torch.zeros_like(counts)
    for g, r in enumerate(rows):
        want[g, :-(-r // BM)] = THREADS
    assert torch.equal(counts, want), (mode, m, n, masked_m, sms)
    assert int((counts > 0).sum()) == tiles
    return first, grid, tm, tn


@SIM
@pytest.mark.parametrize("sms", [1, 5, 13, 132])
def test_dense_and_contiguous_every_tile_once_and_first_wave_in_one_band(module, sms):
    for m, n in [(1, 1), (64, 48), (65, 49), (300, 500), (1000, 97)]:
        for mode in ("dense", "contiguous"):
            first, grid, tm, tn = run(module, mode, m, n, 1, [], sms)
            # the first wave: gridDim.x consecutive raster tiles start in ceil(grid / (BAND tn)) bands
            bands = {int(b) // BAND for b in first}
            assert len(bands) <= -(-grid // (BAND * tn)) + 1, (m, n, sms, sorted(bands))


@SIM
@pytest.mark.parametrize("sms", [1, 4, 9, 132])
def test_masked_every_tile_once_empty_experts_and_rows_past_masked_m(module, sms):
    rng = np.random.default_rng(15)
    cases = [(200, 100, [0, 0, 0]), (200, 100, [200, 0, 1, 65]), (130, 49, [0, 130, 0, 64, 129]),
             (256, 96, [int(x) for x in rng.integers(0, 257, size=6)])]
    for m, n, masked_m in cases:
        run(module, "masked", m, n, len(masked_m), masked_m, sms)
