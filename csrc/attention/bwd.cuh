// Fused attention backward (FlashAttention-2), three kernels, no atomics: deterministic.
//
//   delta[i]  = sum_d dout[i, d] o[i, d]                       (attn_bwd_delta)
//   P         = exp2(scale log2e q . k - lse log2e)            (recomputed from the saved lse)
//   dP        = dout V^T,  dS = P * (dP - delta)
//   dQ        = scale dS K                                      (attn_bwd_dq: one CTA per
//               query tile loops over key tiles, like the forward)
//   dV        = P^T dout,  dK = scale dS^T Q                    (attn_bwd_dkdv: one CTA per
//               key tile loops over the G query heads sharing its key head, then over their
//               query tiles: the GQA reduction is a fixed-order sum in registers)
// dQ is a separate pass rather than fp32 atomics from the dK/dV kernel: it recomputes S and
// dP once more (~1.4x the backward's MMAs) but every gradient is summed in one fixed order,
// so runs are bit-for-bit reproducible, and no fp32 dQ buffer or conversion pass is needed.
//
// attn_bwd_dq: grid (ceil(max_sq / BM), Hq, batch), BM / 16 warps of 16 query rows.
//   smem: BM (DQK + DV) * 2 (Q, dout) + 2 BN (DQK + DV) * 2 (K, V, two stages).
// attn_bwd_dkdv: grid (ceil(max_sk / BN), Hkv, batch), BN / 16 warps of 16 key rows; the
//   warp computes S^T = K Q^T directly, so P^T and dS^T are A fragments in registers.
//   smem: BN (DQK + DV) * 2 (K, V) + 2 (BM (DQK + DV) * 2 + 8 BM) (Q, dout, lse, delta x2).
// Constraints as the forward (fwd.cuh).
#pragma once

#include "csrc/attention/mainloop.cuh"
#include "csrc/attention/softmax.cuh"

namespace fmo {
namespace attn {

// delta = rowsum(dout * o) in fp32, one warp per (query row, head); lanes split D.
template <typename T, int DV, int WARPS>
FMO_DEVICE void attn_bwd_delta(const AttnParams& p) {
    static_assert(DV % 32 == 0, "lanes split D evenly");
    const int lane = int(threadIdx.x) % 32;
    const int64_t item = int64_t(blockIdx.x) * WARPS + int(threadIdx.x) / 32;
    if (item >= p.rows_q * p.heads_q) return;  // whole warps
    const int64_t r = item / p.heads_q, h = item % p.heads_q;
    const T* o = static_cast<const T*>(p.o) + r * p.o_row_stride + h * DV;
    const T* d = static_cast<const T*>(p.dout) + r * p.o_row_stride + h * DV;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < DV / 32; ++i) acc = fmaf(to_float(o[lane + 32 * i]), to_float(d[lane + 32 * i]), acc);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    // Dense rows are b * Sq + i ([B, Hq, Sq]); varlen rows index [Hq, total] directly.
    const int64_t b = p.cu_seqlens_q ? 0 : r / p.seqlen_q, i = p.cu_seqlens_q ? r : r % p.seqlen_q;
    if (lane == 0) p.delta[b * p.lse_batch_stride + h * p.lse_head_stride + i] = acc;
}

template <int BM_, int BN_, int DQK_, int DV_>
struct BwdShape {
    static constexpr int BM = BM_, BN = BN_, DQK = DQK_, DV = DV_;
    using TileQ = SmemTile<BM, DQK>;
    using TileO = SmemTile<BM, DV>;  // dout
    using TileK = SmemTile<BN, DQK>;
    using TileV = SmemTile<BN, DV>;
    // dQ kernel: warps own query rows.
    static constexpr int kDqThreads = 32 * (BM / 16);
    static constexpr int kDqSmemBytes = TileQ::kBytes + TileO::kBytes + 2 * (TileK::kBytes + TileV::kBytes);
    // dK/dV kernel: warps own key rows.
    static constexpr int kDkvThreads = 32 * (BN / 16);
    static constexpr int kDkvStageBytes = TileQ::kBytes + TileO::kBytes + 2 * 4 * BM;
    static constexpr int kDkvSmemBytes = TileK::kBytes + TileV::kBytes + 2 * kDkvStageBytes;
    static_assert(BM % 16 == 0 && BN % 16 == 0, "whole m16 row tiles and k16 steps");
};

template <typename T, int BM, int BN, int DQK, int DV, bool CAUSAL>
FMO_DEVICE void attn_bwd_dq(const AttnParams& p) {
    using Shape = BwdShape<BM, BN, DQK, DV>;
    constexpr int kThreads = Shape::kDqThreads, NT = BN / 8;
    const int m0 = int(blockIdx.x) * BM, h = int(blockIdx.y);
    const SeqView s = sequence(p, blockIdx.z);
    if (m0 >= s.sq) return;
    const int hk = h / int(p.heads_q / p.heads_kv);
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;

    typename Shape::TileQ tq{fmo_attn_smem};
    typename Shape::TileO tdo{tq.base + Shape::TileQ::kBytes};
    uint8_t* kv = tdo.base + Shape::TileO::kBytes;
    auto tk = [&](int st) { return typename Shape::TileK{kv + st * Shape::TileK::kBytes}; };
    auto tv = [&](int st) { return typename Shape::TileV{kv + 2 * Shape::TileK::kBytes + st * Shape::TileV::kBytes}; };

    const T* q = static_cast<const T*>(p.q) + (s.q_start + m0) * p.q_row_stride + int64_t(h) * DQK;
    const T* dout = static_cast<const T*>(p.dout) + (s.q_start + m0) * p.o_row_stride + int64_t(h) * DV;
    const T* k = static_cast<const T*>(p.k) + s.k_start * p.k_row_stride + int64_t(hk) * DQK;
    const T* v = static_cast<const T*>(p.v) + s.k_start * p.v_row_stride + int64_t(hk) * DV;
    const T* kbase = static_cast<const T*>(p.k);
    const T* vbase = static_cast<const T*>(p.v);

    const int n_end = causal_key_end(CAUSAL, m0, BM, s.sq, s.sk);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile<kThreads>(tq, q, p.q_row_stride, s.sq - m0, static_cast<const T*>(p.q));
    load_tile<kThreads>(tdo, dout, p.o_row_stride, s.sq - m0, static_cast<const T*>(p.dout));
    if (n_tiles > 0) {
        load_tile<kThreads>(tk(0), k, p.k_row_stride, s.sk, kbase);
        load_tile<kThreads>(tv(0), v, p.v_row_stride, s.sk, vbase);
    }
    ptx::cp_async_commit();

    // This thread's two rows: lse (log2 domain) and delta.
    float lse2[2], delta[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = m0 + warp * 16 + lane / 4 + 8 * hh;
        const int64_t idx = s.lse_base + h * p.lse_head_stride + r;
        lse2[hh] = r < s.sq ? lse_log2_for_backward(p.lse[idx]) : -neg_inf();
        delta[hh] = r < s.sq ? p.delta[idx] : 0.0f;
    }

    float dq[DQK / 8][4];
    zero(dq);
    for (int j = 0; j < n_tiles; ++j) {
        __syncthreads();  // everyone is done with tile j - 1, whose stage tile j + 1 refills
        if (j + 1 < n_tiles) {
            const int n1 = (j + 1) * BN, st = (j + 1) % 2;
            load_tile<kThreads>(tk(st), k + n1 * p.k_row_stride, p.k_row_stride, s.sk - n1, kbase);
            load_tile<kThreads>(tv(st), v + n1 * p.v_row_stride, p.v_row_stride, s.sk - n1, vbase);
        }
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
        __syncthreads();

        const int n0 = j * BN, st = j % 2;
        float sc[NT][4], dp[NT][4];
        zero(sc);
        gemm_ss<T>(sc, tq, warp * 16, tk(st), 0);
        apply_mask(sc, CAUSAL, m0 + warp * 16, n0, s.sq, s.sk);
        zero(dp);
        gemm_ss<T>(dp, tdo, warp * 16, tv(st), 0);
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pv = exp2f(fmaf(sc[ni][e], p.scale_log2, -lse2[e / 2]));
                sc[ni][e] = pv * (dp[ni][e] - delta[e / 2]);  // dS
            }
        gemm_rs<T>(dq, sc, tk(st), 0);
    }
    ptx::cp_async_wait_all();
    T* dqp = static_cast<T*>(p.dq) + s.q_start * p.q_row_stride + int64_t(h) * DQK;
    store_rows<T>(dqp, p.q_row_stride, m0 + warp * 16, s.sq, dq, p.softmax_scale);
}

template <typename T, int BM, int BN, int DQK, int DV, bool CAUSAL>
FMO_DEVICE void attn_bwd_dkdv(const AttnParams& p) {
    using Shape = BwdShape<BM, BN, DQK, DV>;
    constexpr int kThreads = Shape::kDkvThreads, MT = BM / 8;
    const int n0 = int(blockIdx.x) * BN, hk = int(blockIdx.y);
    const SeqView s = sequence(p, blockIdx.z);
    if (n0 >= s.sk) return;
    const int group = int(p.heads_q / p.heads_kv);
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, t = lane % 4;

    typename Shape::TileK tk{fmo_attn_smem};
    typename Shape::TileV tv{tk.base + Shape::TileK::kBytes};
    uint8_t* stages = tv.base + Shape::TileV::kBytes;
    auto tile_q = [&](int st) { return typename Shape::TileQ{stages + st * Shape::kDkvStageBytes}; };
    auto tile_do = [&](int st) { return typename Shape::TileO{stages + st * Shape::kDkvStageBytes + Shape::TileQ::kBytes}; };
    auto lse_s = [&](int st) {
        return reinterpret_cast<float*>(stages + st * Shape::kDkvStageBytes + Shape::TileQ::kBytes + Shape::TileO::kBytes);
    };
    auto delta_s = [&](int st) { return lse_s(st) + BM; };

    const T* k = static_cast<const T*>(p.k) + (s.k_start + n0) * p.k_row_stride + int64_t(hk) * DQK;
    const T* v = static_cast<const T*>(p.v) + (s.k_start + n0) * p.v_row_stride + int64_t(hk) * DV;
    // Causal: query i sees key j iff i >= j - (sk - sq); the first query tile that sees any
    // key of this tile, and every tile after it.
    const int first_q = CAUSAL ? (n0 - (s.sk - s.sq) > 0 ? n0 - (s.sk - s.sq) : 0) : 0;
    const int m_first = first_q / BM, m_tiles = (s.sq + BM - 1) / BM;
    const int per_head = m_tiles > m_first ? m_tiles - m_first : 0;
    const int iters = group * per_head;

    // Iteration it: query head hk * G + it / per_head, query tile m_first + it % per_head.
    auto load_iter = [&](int it, int st) {
        const int h = hk * group + it / per_head, m0 = (m_first + it % per_head) * BM;
        const T* q = static_cast<const T*>(p.q) + (s.q_start + m0) * p.q_row_stride + int64_t(h) * DQK;
        const T* dout = static_cast<const T*>(p.dout) + (s.q_start + m0) * p.o_row_stride + int64_t(h) * DV;
        load_tile<kThreads>(tile_q(st), q, p.q_row_stride, s.sq - m0, static_cast<const T*>(p.q));
        load_tile<kThreads>(tile_do(st), dout, p.o_row_stride, s.sq - m0, static_cast<const T*>(p.dout));
        const int64_t idx = s.lse_base + h * p.lse_head_stride + m0;
        load_row_values<kThreads, BM>(lse_s(st), p.lse + idx, s.sq - m0);
        load_row_values<kThreads, BM>(delta_s(st), p.delta + idx, s.sq - m0);
    };

    load_tile<kThreads>(tk, k, p.k_row_stride, s.sk - n0, static_cast<const T*>(p.k));
    load_tile<kThreads>(tv, v, p.v_row_stride, s.sk - n0, static_cast<const T*>(p.v));
    if (iters > 0) load_iter(0, 0);
    ptx::cp_async_commit();

    float dk[DQK / 8][4], dv[DV / 8][4];
    zero(dk);
    zero(dv);
    for (int it = 0; it < iters; ++it) {
        __syncthreads();  // everyone is done with iteration it - 1's stage
        if (it + 1 < iters) load_iter(it + 1, (it + 1) % 2);
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
        __syncthreads();

        const int st = it % 2, m0 = (m_first + it % per_head) * BM;
        const float* lse_tile = lse_s(st);
        const float* delta_tile = delta_s(st);
        float pt[MT][4], dpt[MT][4];
        zero(pt);
        gemm_ss<T>(pt, tk, warp * 16, tile_q(st), 0);  // S^T: [16 keys, BM queries]
        apply_mask<MT, true>(pt, CAUSAL, n0 + warp * 16, m0, s.sq, s.sk);
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = mi * 8 + 2 * t + e % 2;  // query column in the tile
                // Masked columns (past sq) read lse = 0 and have score -inf: p = 0.
                pt[mi][e] = exp2f(fmaf(pt[mi][e], p.scale_log2, -lse_log2_for_backward(lse_tile[c])));
            }
        gemm_rs<T>(dv, pt, tile_do(st), 0);  // dV += P^T dout
        zero(dpt);
        gemm_ss<T>(dpt, tv, warp * 16, tile_do(st), 0);  // dP^T = V dout^T
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = mi * 8 + 2 * t + e % 2;
                dpt[mi][e] = pt[mi][e] * (dpt[mi][e] - delta_tile[c]);  // dS^T
            }
        gemm_rs<T>(dk, dpt, tile_q(st), 0);  // dK += dS^T Q
    }
    ptx::cp_async_wait_all();
    T* dkp = static_cast<T*>(p.dk) + (s.k_start + n0) * p.k_row_stride + int64_t(hk) * DQK;
    T* dvp = static_cast<T*>(p.dv) + (s.k_start + n0) * p.v_row_stride + int64_t(hk) * DV;
    store_rows<T>(dkp, p.k_row_stride, warp * 16, s.sk - n0, dk, p.softmax_scale);
    store_rows<T>(dvp, p.v_row_stride, warp * 16, s.sk - n0, dv, 1.0f);
}

}  // namespace attn
}  // namespace fmo
