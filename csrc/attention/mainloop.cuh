// Building blocks shared by the attention kernels: shared-memory tiles, their cp.async
// loaders, and the two warp-level GEMMs every FlashAttention-2 product reduces to.
//
// A warp always owns 16 rows (one m16 MMA row tile) of its output:
//   gemm_ss  acc[16, 8 NT] += A[16, D] . B[8 NT, D]^T   A and B rows in shared memory
//            (S = Q K^T, dP = dO V^T, S^T = K Q^T, dP^T = V dO^T: all "NT", D contiguous)
//   gemm_rs  acc[16, 8 DT] += P[16, 16 KT/2] . B[16 KT/2, 8 DT]   P from registers
//            (O += P V, dQ += dS K, dV += P^T dO, dK += dS^T Q), B rows = the reduced dim,
//            read with ldmatrix.trans.
// gemm_rs takes P as fp32 MMA accumulators: the m16n8 C fragment of two adjacent n8 tiles
// is, element for element, the m16k16 A fragment (row g / g + 8, columns 2t, 2t + 1 and
// 2t + 8, 2t + 9), so P never goes through shared memory; it is rounded to T on the way.
//
// Tiles are [ROWS][D] 16-bit elements, row-major, 16-byte chunks XOR-swizzled by row % 8:
// the 8 rows one ldmatrix phase reads (same logical chunk, plain or .trans) land in 8
// different bank groups. Requires D % 64 == 0 (whole 8-chunk swizzle groups per row).
#pragma once

#include "csrc/attention/params.cuh"
#include "ptx/cp_async.cuh"
#include "ptx/ldmatrix.cuh"
#include "ptx/mma.cuh"

namespace fmo {
namespace attn {

template <int ROWS_, int D_>
struct SmemTile {
    static constexpr int ROWS = ROWS_, D = D_;
    static constexpr int kChunks = D / 8;                // 16-byte chunks per row
    static constexpr int kBytes = ROWS * D * 2;
    static_assert(D % 64 == 0, "tile rows must be whole 8-chunk swizzle groups (D % 64 == 0)");
    static_assert(ROWS % 16 == 0, "tiles are whole m16 / k16 blocks of rows");

    uint8_t* base;

    FMO_DEVICE uint8_t* chunk(int row, int c) const { return base + row * (D * 2) + ((c ^ (row % 8)) * 16); }
};

// Issue (without committing) the cp.async of rows [0, ROWS) of one head: global row r is at
// `src + r * row_stride` (elements). Rows >= rows_valid are zero-filled (src-size 0; they
// still name a valid address, `fallback`), so they add nothing to any product.
template <int THREADS, class Tile, typename T>
FMO_DEVICE void load_tile(Tile tile, const T* src, int64_t row_stride, int rows_valid, const T* fallback) {
    static_assert(sizeof(T) == 2, "16-bit elements");
    constexpr int kTotal = Tile::ROWS * Tile::kChunks;
#pragma unroll
    for (int i = 0; i < (kTotal + THREADS - 1) / THREADS; ++i) {
        const int c = i * THREADS + int(threadIdx.x);
        if (kTotal % THREADS != 0 && c >= kTotal) break;
        const int row = c / Tile::kChunks, chunk = c % Tile::kChunks;
        const bool ok = row < rows_valid;
        ptx::cp_async_cg16(tile.chunk(row, chunk), ok ? src + row * row_stride + chunk * 8 : fallback, ok ? 16 : 0);
    }
}

// Per-row fp32 values (lse, delta) for ROWS rows into shared memory; rows >= rows_valid get 0.
template <int THREADS, int ROWS>
FMO_DEVICE void load_row_values(float* dst, const float* src, int rows_valid) {
    for (int r = int(threadIdx.x); r < ROWS; r += THREADS) {
        const bool ok = r < rows_valid;
        ptx::cp_async_ca<4>(dst + r, ok ? src + r : src, ok ? 4 : 0);
    }
}

// bf16 or fp16 (no <type_traits> under NVRTC).
template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

template <typename T>
FMO_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (IsBf16<T>::value) {
        ptx::mma_m16n8k16_bf16(d, a, b, d);
    } else {
        ptx::mma_m16n8k16_f16(d, a, b, d);
    }
}

// Two fp32 values as one register of two T (the low half is the first, lower column).
template <typename T>
FMO_DEVICE uint32_t pack2(float lo, float hi) {
    if constexpr (IsBf16<T>::value) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return reinterpret_cast<const uint32_t&>(v);
    } else {
        const __half2 v = __floats2half2_rn(lo, hi);
        return reinterpret_cast<const uint32_t&>(v);
    }
}

template <int NT>
FMO_DEVICE void zero(float (&acc)[NT][4]) {
#pragma unroll
    for (int i = 0; i < NT; ++i)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][r] = 0.0f;
}

// acc[16, 8 NT] += A[a_row0 .. +16, 0 .. D) . B[b_row0 .. +8 NT, 0 .. D)^T
template <typename T, int NT, class TileA, class TileB>
FMO_DEVICE void gemm_ss(float (&acc)[NT][4], TileA a, int a_row0, TileB b, int b_row0) {
    static_assert(TileA::D == TileB::D, "the reduced dimension must match");
    static_assert(NT % 2 == 0, "B is read as pairs of n8 tiles (ldmatrix.x4)");
    const int lane = int(threadIdx.x) % 32;
    // Not unrolled: one k16 step's fragments live at a time (unrolled, ptxas hoists every
    // step's ldmatrix and the D = 128 kernels run out of registers).
#pragma unroll 1
    for (int ks = 0; ks < TileA::D / 16; ++ks) {
        // x4: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
        uint32_t af[4];
        ptx::ldmatrix_x4(af, a.chunk(a_row0 + lane % 8 + 8 * ((lane / 8) % 2), 2 * ks + lane / 16));
#pragma unroll
        for (int nj = 0; nj < NT / 2; ++nj) {
            // x4: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
            uint32_t r[4];
            ptx::ldmatrix_x4(r, b.chunk(b_row0 + nj * 16 + lane % 8 + 8 * (lane / 16), 2 * ks + (lane / 8) % 2));
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma<T>(acc[2 * nj], af, b0);
            mma<T>(acc[2 * nj + 1], af, b1);
        }
    }
}

// acc[16, 8 DT] += P[16, 8 KT] . B[b_row0 .. +8 KT, 0 .. 8 DT), P given as KT C fragments.
template <typename T, int DT, int KT, class TileB>
FMO_DEVICE void gemm_rs(float (&acc)[DT][4], const float (&p)[KT][4], TileB b, int b_row0) {
    static_assert(DT * 8 == TileB::D, "the output spans the tile's full width");
    static_assert(KT % 2 == 0 && DT % 2 == 0, "k16 steps and pairs of n8 tiles");
    const int lane = int(threadIdx.x) % 32;
#pragma unroll
    for (int kk = 0; kk < KT / 2; ++kk) {
        const uint32_t af[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                                pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dj = 0; dj < DT / 2; ++dj) {
            // .trans x4: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
            uint32_t r[4];
            ptx::ldmatrix_x4_trans(r, b.chunk(b_row0 + kk * 16 + lane % 8 + 8 * ((lane / 8) % 2), 2 * dj + lane / 16));
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            mma<T>(acc[2 * dj], af, b0);
            mma<T>(acc[2 * dj + 1], af, b1);
        }
    }
}

// Store a warp's [16, 8 NT] fp32 accumulators (times `mul`) as T to rows r0 + (0..15) of
// `dst` (row stride elements), rows >= rows_valid skipped; two adjacent columns per store.
template <typename T, int NT>
FMO_DEVICE void store_rows(T* dst, int64_t row_stride, int r0, int rows_valid, const float (&acc)[NT][4], float mul) {
    const int lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + g + 8 * h;
        if (r >= rows_valid) continue;
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
            const uint32_t v = pack2<T>(acc[ni][2 * h] * mul, acc[ni][2 * h + 1] * mul);
            *reinterpret_cast<uint32_t*>(dst + r * row_stride + ni * 8 + 2 * t) = v;  // 4-byte aligned: D, 2t even
        }
    }
}

}  // namespace attn
}  // namespace fmo
