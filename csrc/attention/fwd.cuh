// Fused attention forward (FlashAttention-2 on mma.sync m16n8k16, bf16/fp16 -> fp32):
//
//   o[i, h]   = sum_j softmax_j(scale q[i, h] . k[j, h / G]) v[j, h / G]
//   lse[h, i] = log sum_j exp(scale q[i, h] . k[j, h / G])
// over the keys row i may see (all, or bottom-right causal: j <= i + sk - sq). GQA/MQA by
// head index: query head h reads key/value head h / (Hq / Hkv). Varlen: cu_seqlens.
//
// Grid (ceil(max_sq / BM), Hq, batch); BM / 16 warps, each owning 16 query rows. The CTA
// walks key tiles of BN rows: S = Q K^T (gemm_ss), mask, online softmax in registers, then
// O += P V (gemm_rs, P straight from the accumulators). K/V tiles are double-buffered with
// cp.async: tile j + 1 is in flight while tile j is computed. Causal: key tiles past the
// block's last visible key are skipped (never loaded); a row that sees no key stores 0 and
// lse = -inf.
// Shared memory: BM * DQK * 2 (Q) + 2 * BN * (DQK + DV) * 2 (K, V, two stages) bytes.
// Constraints: DQK, DV multiples of 64 (the launcher allows (64, 64), (128, 128) and MLA's
// (192, 128)), rows 16-byte aligned (row strides multiples of 8 elements).
#pragma once

#include "csrc/attention/mainloop.cuh"
#include "csrc/attention/softmax.cuh"

namespace fmo {
namespace attn {

template <int BM_, int BN_, int DQK_, int DV_>
struct FwdShape {
    static constexpr int BM = BM_, BN = BN_, DQK = DQK_, DV = DV_;
    static constexpr int kWarps = BM / 16, kThreads = 32 * kWarps;
    static constexpr int NT = BN / 8, DT = DV / 8;
    using TileQ = SmemTile<BM, DQK>;
    using TileK = SmemTile<BN, DQK>;
    using TileV = SmemTile<BN, DV>;
    static constexpr int kSmemBytes = TileQ::kBytes + 2 * (TileK::kBytes + TileV::kBytes);
    static_assert(BM % 16 == 0 && BN % 16 == 0, "whole m16 row tiles and k16 key steps");
};

// The epilogue: o / l and lse of a thread's two rows, query positions qi[h] of query heads hd[h]
// (consecutive rows of one head here; hopper_fwd.cuh's packed rows each have their own). Rows at
// or past sq (a tile's ragged end, a TMA box's zero fill or the next sequence's rows) are not stored.
template <typename T, class Shape>
FMO_DEVICE void fwd_epilogue(const AttnParams& p, const SeqView& s, const int (&qi)[2], const int (&hd)[2],
                             const float (&o)[Shape::DT][4], OnlineSoftmax& sm) {
    float inv_l[2], lse[2];
    sm.finish(inv_l, lse);
    const int t = int(threadIdx.x) % 4;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        if (qi[hh] >= s.sq) continue;
        T* out = static_cast<T*>(p.o) + (s.q_start + qi[hh]) * p.o_row_stride + int64_t(hd[hh]) * Shape::DV;
#pragma unroll
        for (int di = 0; di < Shape::DT; ++di)
            *reinterpret_cast<uint32_t*>(out + di * 8 + 2 * t) = pack2<T>(o[di][2 * hh] * inv_l[hh], o[di][2 * hh + 1] * inv_l[hh]);
        if (t == 0) p.lse[s.lse_base + hd[hh] * p.lse_head_stride + qi[hh]] = lse[hh];
    }
}

template <typename T, int BM, int BN, int DQK, int DV, bool CAUSAL>
FMO_DEVICE void attn_fwd(const AttnParams& p) {
    using Shape = FwdShape<BM, BN, DQK, DV>;
    const int m0 = int(blockIdx.x) * BM, h = int(blockIdx.y);
    const SeqView s = sequence(p, blockIdx.z);
    if (m0 >= s.sq) return;  // varlen: this sequence is shorter than the grid (whole CTA)
    const int hk = h / int(p.heads_q / p.heads_kv);
    const int warp = int(threadIdx.x) / 32;

    typename Shape::TileQ tq{fmo_attn_smem};
    // Stages by arithmetic on the base (an array of tiles indexed by j % 2 would live on the stack).
    uint8_t* const kv = tq.base + Shape::TileQ::kBytes;
    auto tk = [&](int st) { return typename Shape::TileK{kv + st * Shape::TileK::kBytes}; };
    auto tv = [&](int st) { return typename Shape::TileV{kv + 2 * Shape::TileK::kBytes + st * Shape::TileV::kBytes}; };

    const T* q = static_cast<const T*>(p.q) + (s.q_start + m0) * p.q_row_stride + int64_t(h) * DQK;
    const T* k = static_cast<const T*>(p.k) + s.k_start * p.k_row_stride + int64_t(hk) * DQK;
    const T* v = static_cast<const T*>(p.v) + s.k_start * p.v_row_stride + int64_t(hk) * DV;
    const T* kbase = static_cast<const T*>(p.k);
    const T* vbase = static_cast<const T*>(p.v);

    const int n_end = causal_key_end(CAUSAL, m0, BM, s.sq, s.sk);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile<Shape::kThreads>(tq, q, p.q_row_stride, s.sq - m0, static_cast<const T*>(p.q));
    if (n_tiles > 0) {
        load_tile<Shape::kThreads>(tk(0), k, p.k_row_stride, s.sk, kbase);
        load_tile<Shape::kThreads>(tv(0), v, p.v_row_stride, s.sk, vbase);
    }
    ptx::cp_async_commit();

    int qi[2];  // this thread's two query positions (rows g, g + 8 of the warp's 16)
    consecutive_rows(qi, m0 + warp * 16);
    float o[Shape::DT][4];
    zero(o);
    OnlineSoftmax sm;
    for (int j = 0; j < n_tiles; ++j) {
        __syncthreads();  // everyone is done with tile j - 1, whose stage tile j + 1 refills
        if (j + 1 < n_tiles) {
            const int n1 = (j + 1) * BN, st = (j + 1) % 2;
            load_tile<Shape::kThreads>(tk(st), k + n1 * p.k_row_stride, p.k_row_stride, s.sk - n1, kbase);
            load_tile<Shape::kThreads>(tv(st), v + n1 * p.v_row_stride, p.v_row_stride, s.sk - n1, vbase);
        }
        ptx::cp_async_commit();   // possibly empty: keeps one group per iteration
        ptx::cp_async_wait<1>();  // this thread's copies of tile j (and Q) landed
        __syncthreads();          // everyone's did

        const int n0 = j * BN, st = j % 2;
        float sc[Shape::NT][4];
        zero(sc);
        gemm_ss<T>(sc, tq, warp * 16, tk(st), 0);
        // Only tiles crossing the diagonal or the end of the keys need the mask.
        const bool edge = n0 + BN > s.sk || (CAUSAL && n0 + BN - 1 > m0 + warp * 16 + s.sk - s.sq);
        if (edge) mask_rows(sc, CAUSAL, qi, n0, s.sq, s.sk);
        sm.update(sc, o, p.scale_log2);
        gemm_rs<T>(o, sc, tv(st), 0);
    }
    ptx::cp_async_wait_all();  // nothing may still land in shared memory after the CTA
    const int hd[2] = {h, h};
    fwd_epilogue<T, Shape>(p, s, qi, hd, o, sm);
}

}  // namespace attn
}  // namespace fmo
